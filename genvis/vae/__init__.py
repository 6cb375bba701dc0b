"""The spatio-temporal VAE (ST-VAE) of LaVin-DiT: diffusers ``AutoencoderKLCogVideoX`` presets and frame helpers.

Public API (stable; the LaVin-DiT pipeline and ``train/lavin_dit.py`` use it):

- ``AutoencoderKLSTVAE``: ``AutoencoderKLCogVideoX`` with LaVin's temporal upsampling and whole-clip passes
  (same state dict). ``ST_VAE_CONFIGS`` (``"tiny"``, ``"official"``), ``st_vae_config``, ``build_st_vae``,
  ``load_lavin_st_vae`` (the released ``stvae.pt``).
- ``encode_frames(vae, pixels, mode="sample"|"mode", generator=None, normalize=True)``: ``(B, 3, H, W)`` images or
  ``(B, 3, 1 + 4k, H, W)`` clips in ``[-1, 1]`` -> ``(B, 16, 1 + k, H / 8, W / 8)`` latents.
- ``decode_latents(vae, latents, denormalize=True, clamp=False)``: the inverse, ``(B, 3, 1 + 4k, H, W)``.
- ``normalize_latents`` / ``denormalize_latents`` (``(z - shift) * scale``), ``latent_normalization``,
  ``set_latent_normalization``, ``estimate_latent_normalization``.
- ``check_num_frames``, ``latent_num_frames``, ``pixel_num_frames``: the 1 / 1+4k frame rule.

See ``genvis.vae.autoencoder_st_vae`` for the details; tested in ``tests/vae/test_st_vae.py``.
"""

from genvis.vae.autoencoder_st_vae import (
    OFFICIAL_SCALING_FACTOR,
    OFFICIAL_SHIFT_FACTOR,
    ST_VAE_CONFIGS,
    AutoencoderKLSTVAE,
    STVAECausalConv3d,
    STVAEUpsample3D,
    build_st_vae,
    check_num_frames,
    decode_latents,
    denormalize_latents,
    encode_frames,
    estimate_latent_normalization,
    latent_normalization,
    latent_num_frames,
    load_lavin_st_vae,
    normalize_latents,
    pixel_num_frames,
    posterior,
    set_latent_normalization,
    spatial_compression,
    st_vae_config,
    temporal_compression,
)

__all__ = [
    "OFFICIAL_SCALING_FACTOR",
    "OFFICIAL_SHIFT_FACTOR",
    "ST_VAE_CONFIGS",
    "AutoencoderKLSTVAE",
    "STVAECausalConv3d",
    "STVAEUpsample3D",
    "build_st_vae",
    "check_num_frames",
    "decode_latents",
    "denormalize_latents",
    "encode_frames",
    "estimate_latent_normalization",
    "latent_normalization",
    "latent_num_frames",
    "load_lavin_st_vae",
    "normalize_latents",
    "pixel_num_frames",
    "posterior",
    "set_latent_normalization",
    "spatial_compression",
    "st_vae_config",
    "temporal_compression",
]
