"""diffusers pipelines: in-context generation (LaVin-DiT), text-to-video (MVDiT); export contract in docs/pipelines.md."""

from genvis.pipelines.lavin_dit_evaluation import (
    InContextScore,
    RelianceScore,
    episode_grid_row,
    evaluate_in_context,
    evaluate_reliance,
    psnr,
)
from genvis.pipelines.model_card import read_model_card, write_model_card
from genvis.pipelines.pipeline_lavin_dit import GenvisPipelineMixin, LaVinDiTPipeline, LaVinDiTPipelineOutput

__all__ = [
    "GenvisPipelineMixin",
    "InContextScore",
    "LaVinDiTPipeline",
    "LaVinDiTPipelineOutput",
    "RelianceScore",
    "episode_grid_row",
    "evaluate_in_context",
    "evaluate_reliance",
    "psnr",
    "read_model_card",
    "write_model_card",
]

# Other families load on first use, so importing one model does not import (and pay for) all of them.
_LAZY = {
    "MVDiTPipeline": "genvis.pipelines.pipeline_mvdit",
    "MVDiTPipelineOutput": "genvis.pipelines.pipeline_mvdit",
    "export_video": "genvis.pipelines.pipeline_mvdit",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += list(_LAZY)
