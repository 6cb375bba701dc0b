"""Diffusion objectives: rectified flow (LaVin-DiT); sampling uses diffusers schedulers."""

from genvis.diffusion.in_context import InContextLatents, decode_clips, encode_clips, encode_episodes, vae_compression
from genvis.diffusion.rectified_flow import (
    LAVIN_DIT_TIME_GRID_20,
    RectifiedFlow,
    RectifiedFlowLoss,
    drop_context,
    flow_matching_loss,
    interpolate,
    lavin_time_to_sigma,
    sample_generators,
    sample_logit_normal,
    shift_time,
    sigma_to_lavin_time,
)

__all__ = [
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
    "lavin_time_to_sigma",
    "sample_generators",
    "sample_logit_normal",
    "shift_time",
    "sigma_to_lavin_time",
    "vae_compression",
]
