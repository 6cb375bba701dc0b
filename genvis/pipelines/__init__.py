"""diffusers pipelines: in-context generation (LaVin-DiT)."""

from genvis.pipelines.pipeline_lavin_dit import LaVinDiTPipeline, LaVinDiTPipelineOutput

__all__ = ["LaVinDiTPipeline", "LaVinDiTPipelineOutput"]
