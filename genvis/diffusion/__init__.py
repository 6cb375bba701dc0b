"""Diffusion objectives: rectified flow (LaVin-DiT); sampling uses diffusers schedulers."""

from genvis.diffusion.in_context import InContextLatents, decode_clips, encode_clips, encode_episodes, vae_compression
from genvis.diffusion.rectified_flow import (
    DEFAULT_TIME_GRID,
    LAVIN_DIT_TIME_GRID_20,
    LAVIN_DIT_TIME_GRIDS,
    RectifiedFlow,
    RectifiedFlowLoss,
    drop_context,
    flow_matching_loss,
    interpolate,
    lavin_time_grid_sigmas,
    lavin_time_to_sigma,
    sample_generators,
    sample_logit_normal,
    shift_time,
    sigma_to_lavin_time,
)

__all__ = [
    "DEFAULT_TIME_GRID",
    "LAVIN_DIT_TIME_GRIDS",
    "LAVIN_DIT_TIME_GRID_20",
    "InContextLatents",
    "RectifiedFlow",
    "RectifiedFlowLoss",
    "decode_clips",
    "drop_context",
    "encode_clips",
    "encode_episodes",
    "flow_matching_loss",
    "interpolate",
    "lavin_time_grid_sigmas",
    "lavin_time_to_sigma",
    "sample_generators",
    "sample_logit_normal",
    "shift_time",
    "sigma_to_lavin_time",
    "vae_compression",
]

# Other families load on first use, so importing one model does not import (and pay for) all of them.
_LAZY = {
    "DDPMHybridLoss": "genvis.diffusion.ddpm",
    "DDPMObjective": "genvis.diffusion.ddpm",
    "make_ddpm_scheduler": "genvis.diffusion.ddpm",
    "TextToVideoLoss": "genvis.diffusion.text_to_video",
    "TextToVideoObjective": "genvis.diffusion.text_to_video",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += list(_LAZY)
