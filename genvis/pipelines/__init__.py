"""diffusers pipelines: in-context generation (LaVin-DiT)."""

from genvis.pipelines.lavin_dit_evaluation import InContextScore, episode_grid_row, evaluate_in_context, psnr
from genvis.pipelines.pipeline_lavin_dit import LaVinDiTPipeline, LaVinDiTPipelineOutput

__all__ = [
    "InContextScore",
    "LaVinDiTPipeline",
    "LaVinDiTPipelineOutput",
    "episode_grid_row",
    "evaluate_in_context",
    "psnr",
]
