"""A parameter-free, exact "autoencoder" for pixel-space LaVin-DiT: space-to-depth (pixel unshuffle) per frame.

It has the interface the LaVin-DiT pipeline expects from the ST-VAE (``encode(x).latent_dist``, ``decode(z).sample``,
``config.latent_channels / scaling_factor / shift_factor / temporal_compression_ratio / spatial_compression_ratio``),
so the tiny CPU preset can train the J-DiT in minutes without first training a VAE, and its reconstructions are exact
(PSNR is infinite), which makes in-context metrics measure the transformer alone. Every frame is its own latent frame
(no temporal compression). Tests: tests/lavin/test_pipeline_lavin_dit.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["PixelUnshuffleAutoencoder"]


class PixelUnshuffleAutoencoder(ModelMixin, ConfigMixin):
    """Space-to-depth per frame: ``(B, C, T, H, W)`` -> ``(B, C * f^2, T, H / f, W / f)`` and back, exactly.

    Args:
        in_channels: pixel channels.
        spatial_compression_ratio: the factor ``f``.
        scaling_factor: latent scale (``z_n = (z - shift) * scale``); 2.0 maps [-1, 1] pixels to about unit std.
        shift_factor: latent shift.
        latent_channels: derived, ``in_channels * f^2`` (stored so the config reads like an AutoencoderKL's).
        temporal_compression_ratio: must be 1 (every frame is a latent frame).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        spatial_compression_ratio: int = 2,
        scaling_factor: float = 2.0,
        shift_factor: float = 0.0,
        latent_channels: int | None = None,
        temporal_compression_ratio: int = 1,
    ) -> None:
        super().__init__()
        if spatial_compression_ratio < 1:
            raise ValueError(f"spatial_compression_ratio must be >= 1, got {spatial_compression_ratio}")
        expected = in_channels * spatial_compression_ratio**2
        if latent_channels not in (None, expected):
            raise ValueError(f"latent_channels must be in_channels * ratio^2 = {expected}, got {latent_channels}")
        if temporal_compression_ratio != 1:
            raise ValueError(f"temporal_compression_ratio must be 1, got {temporal_compression_ratio}")
        self.register_to_config(latent_channels=expected)
        # one buffer gives the module a device, a dtype and a (tiny) weights file for save/from_pretrained
        self.register_buffer("anchor", torch.zeros(()))

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """``(B, C, T, H, W)`` in [-1, 1] -> a deterministic posterior over ``(B, C f^2, T, H/f, W/f)``."""
        f = self.config.spatial_compression_ratio
        if x.ndim != 5 or x.shape[1] != self.config.in_channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"x must be (B, {self.config.in_channels}, T, H, W) with H, W divisible by {f}, got {tuple(x.shape)}"
            )
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)
        latents = F.pixel_unshuffle(frames, f)  # (B*T, C f^2, H/f, W/f)
        latents = latents.reshape(B, T, -1, H // f, W // f).transpose(1, 2)
        # zero log-variance + deterministic: sample() == mode() == the exact latents
        dist = DiagonalGaussianDistribution(torch.cat([latents, torch.zeros_like(latents)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """``(B, C f^2, T, h, w)`` -> ``(B, C, T, h f, w f)``."""
        f = self.config.spatial_compression_ratio
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z must be (B, {self.config.latent_channels}, T, h, w), got {tuple(z.shape)}")
        B, _, T, h, w = z.shape
        frames = F.pixel_shuffle(z.transpose(1, 2).reshape(B * T, -1, h, w), f)
        sample = frames.reshape(B, T, -1, h * f, w * f).transpose(1, 2)
        return DecoderOutput(sample=sample) if return_dict else (sample,)
