"""LaVin-DiT's spatial-temporal VAE (ST-VAE) as diffusers ``AutoencoderKLCogVideoX`` configs, plus frame helpers.

LaVin-DiT (arXiv 2411.11505, github.com/DerrickWang005/LaVin-DiT ``lib/model/vae3d.py``) re-implements the CogVideoX
VAE: with the default config, ``AutoencoderKLCogVideoX`` has the same 436 state-dict keys and shapes, so the released
``stvae.pt`` loads into it unchanged (``load_lavin_st_vae``). Compression is 4x in time and 8x in space:

- an image is a 1-frame clip ``(B, 3, 1, H, W)`` and maps to exactly one latent frame;
- a video must have ``T = 1 + 4k`` frames and maps to ``1 + k`` latent frames; other counts raise ``ValueError``.

Latent normalisation for the DiT is a shift and a scale, ``(z - shift) * scale``, stored in the config fields
``shift_factor`` / ``scaling_factor`` (official: shift 0.032470703125, scale 1.08936170213; the tiny preset estimates
them from data with ``estimate_latent_normalization``). LaVin encodes with a posterior *sample*.

``AutoencoderKLSTVAE`` is ``AutoencoderKLCogVideoX`` with LaVin's two behavioural differences (same weights):

1. the temporal upsampler keeps latent frame 0 single for *every* frame count; diffusers only does so for an odd
   count, so its decoder turns a 5-frame clip's 2 latents into 8 frames instead of 5;
2. ``encode`` / ``decode`` run on the whole clip in one pass; diffusers splits clips into 8-frame / 2-latent batches,
   which changes GroupNorm statistics for clips longer than 9 frames (specs/lavin_dit_mvdit.md §2.3).

and one that only changes speed: on a 1-frame input (an image) a causal 3-D conv sees its frame replicated
``kernel_t`` times, which equals a 2-D conv with the kernel summed over time (``STVAECausalConv3d``); same outputs
and gradients up to float rounding, ~3x cheaper per image conv on CPU (measured 15.7 vs 4.5 ms, 32 ch, 32 px).

Checked by ``tests/vae/test_st_vae.py``.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up in this module)
from diffusers.models.upsampling import CogVideoXUpsample3D

# Released ST-VAE latent statistics (LaVin-DiT inference.py): z_dit = (z - shift) * scale.
OFFICIAL_SHIFT_FACTOR = 0.032470703125
OFFICIAL_SCALING_FACTOR = 1.08936170213

# ``AutoencoderKLCogVideoX`` keyword arguments per preset (JSON types, as saved in config.json).
ST_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # CI size: 2.8 M parameters; block widths must be multiples of norm_num_groups.
    "tiny": {
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 16,
        "temporal_compression_ratio": 4,
        "sample_height": 64,
        "sample_width": 64,
        # Placeholders until estimate_latent_normalization has seen data.
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    },
    # LaVin's released ST-VAE (215.6 M parameters): the CogVideoX layout, 3 resnets per encoder block (4 in the
    # decoder, which diffusers derives as layers_per_block + 1), GroupNorm 32, eps 1e-6, no quant convs.
    "official": {
        "block_out_channels": [128, 256, 256, 512],
        "layers_per_block": 3,
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "latent_channels": 16,
        "temporal_compression_ratio": 4,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": OFFICIAL_SCALING_FACTOR,
        "shift_factor": OFFICIAL_SHIFT_FACTOR,
    },
}


class STVAEUpsample3D(CogVideoXUpsample3D):
    """CogVideoX temporal upsampler that keeps frame 0 single for any frame count, as LaVin's ST-VAE does."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.compress_time or inputs.shape[2] % 2 == 1:
            return super().forward(inputs)  # identical to LaVin for 1 frame and for odd counts
        # Even count: diffusers doubles every frame; LaVin upsamples frame 0 in space only and doubles the rest.
        first = F.interpolate(inputs[:, :, 0], scale_factor=2.0)[:, :, None]  # (B, C, 1, 2H, 2W)
        rest = F.interpolate(inputs[:, :, 1:], scale_factor=2.0)  # (B, C, 2(T-1), 2H, 2W)
        upsampled = torch.cat([first, rest], dim=2)  # (B, C, 2T-1, 2H, 2W)
        batch, channels, frames, height, width = upsampled.shape
        per_frame = upsampled.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        convolved = self.conv(per_frame)  # (B * (2T-1), C', 2H, 2W)
        return convolved.reshape(batch, frames, *convolved.shape[1:]).permute(0, 2, 1, 3, 4)


class STVAECausalConv3d(CogVideoXCausalConv3d):
    """CogVideoX causal conv with an exact 2-D path for 1-frame inputs (no new state; same state-dict keys).

    Causal padding repeats frame 0 ``kernel_t - 1`` times, so a 1-frame input becomes ``kernel_t`` identical frames
    and the 3-D conv equals a 2-D conv with ``weight.sum(dim=2)``. Any other input takes diffusers' path.
    """

    def forward(self, inputs: torch.Tensor, conv_cache: torch.Tensor | None = None):
        conv = self.conv
        if (
            inputs.shape[2] != 1
            or conv_cache is not None
            or self.pad_mode == "replicate"
            or conv.stride[0] != 1
            or conv.dilation[0] != 1
        ):
            return super().forward(inputs, conv_cache)
        output = F.conv2d(
            inputs[:, :, 0], conv.weight.sum(dim=2), conv.bias, conv.stride[1:], conv.padding[1:], conv.dilation[1:]
        )  # (B, C', H', W')
        # diffusers' cache: the last max(kernel_t - 1, 1) frames of the padded input, all copies of frame 0.
        cache = inputs.expand(-1, -1, max(self.time_kernel_size - 1, 1), -1, -1).clone()
        return output[:, :, None], cache


class AutoencoderKLSTVAE(AutoencoderKLCogVideoX):
    """LaVin-DiT's ST-VAE: ``AutoencoderKLCogVideoX`` weights with LaVin's temporal upsampling and whole-clip passes.

    Args: see ``AutoencoderKLCogVideoX`` (the same config fields; ``ST_VAE_CONFIGS`` holds the presets).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4,
        up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        latent_channels: int = 16,
        layers_per_block: int = 3,
        act_fn: str = "silu",
        norm_eps: float = 1e-6,
        norm_num_groups: int = 32,
        temporal_compression_ratio: float = 4,
        sample_height: int = 480,
        sample_width: int = 720,
        scaling_factor: float = OFFICIAL_SCALING_FACTOR,
        shift_factor: float | None = OFFICIAL_SHIFT_FACTOR,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: float = True,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        invert_scale_latents: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            latent_channels=latent_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_eps=norm_eps,
            norm_num_groups=norm_num_groups,
            temporal_compression_ratio=temporal_compression_ratio,
            sample_height=sample_height,
            sample_width=sample_width,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latents_mean=latents_mean,
            latents_std=latents_std,
            force_upcast=force_upcast,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            invert_scale_latents=invert_scale_latents,
        )
        # Swap the temporal upsamplers for LaVin's, reusing their convs (state-dict keys are unchanged).
        for up_block in self.decoder.up_blocks:
            for index, upsampler in enumerate(up_block.upsamplers or []):
                if upsampler.compress_time:
                    replacement = STVAEUpsample3D(1, 1, compress_time=True)
                    replacement.conv = upsampler.conv
                    up_block.upsamplers[index] = replacement
        # The image fast path: same modules and weights, a forward that skips the replicated frames.
        for module in self.modules():
            if type(module) is CogVideoXCausalConv3d:
                module.__class__ = STVAECausalConv3d

    def _tiles(self, tensor: torch.Tensor, latent: bool) -> bool:
        height = self.tile_latent_min_height if latent else self.tile_sample_min_height
        width = self.tile_latent_min_width if latent else self.tile_sample_min_width
        return self.use_tiling and (tensor.shape[-1] > width or tensor.shape[-2] > height)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self._tiles(x, latent=False):
            return self.tiled_encode(x)
        moments, _ = self.encoder(x)  # (B, 2C, t, h, w): mean and logvar of the whole clip at once
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        if self._tiles(z, latent=True):
            return self.tiled_decode(z, return_dict=return_dict)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        decoded, _ = self.decoder(z)  # (B, 3, T, H, W), all latent frames at once
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)


def st_vae_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A copy of ``ST_VAE_CONFIGS[preset]`` with ``overrides`` applied (unknown preset -> ``ValueError``)."""
    if preset not in ST_VAE_CONFIGS:
        raise ValueError(f"preset: expected one of {list(ST_VAE_CONFIGS)}, got {preset!r}")
    known = set(inspect.signature(AutoencoderKLCogVideoX.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ST-VAE config field(s) {unknown}; expected fields of {sorted(known)}")
    config = copy.deepcopy(ST_VAE_CONFIGS[preset])
    config.update(overrides)
    widths, groups = config["block_out_channels"], config["norm_num_groups"]
    if any(width % groups for width in widths):
        raise ValueError(f"block_out_channels: expected multiples of norm_num_groups={groups}, got {widths}")
    return config


def build_st_vae(preset: str = "tiny", **overrides: Any) -> AutoencoderKLSTVAE:
    """A randomly initialised ST-VAE of ``preset`` (``"tiny"`` or ``"official"``) with config ``overrides``."""
    return AutoencoderKLSTVAE(**st_vae_config(preset, **overrides))


def load_lavin_st_vae(checkpoint: str | os.PathLike, preset: str = "official") -> AutoencoderKLSTVAE:
    """Load LaVin-DiT's released ``stvae.pt`` (a dict with the weights under ``state_dict``) strictly.

    Raises:
        ValueError: the file holds no state dict, or its keys / shapes do not match the ``preset`` layout.
    """
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_dict = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{checkpoint}: expected a state dict (optionally under 'state_dict'), got {type(payload)}")
    vae = build_st_vae(preset)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{checkpoint}: does not match the {preset!r} ST-VAE layout: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shapes {wrong[:5]} ({len(wrong)})"
        )
    vae.load_state_dict(state_dict, strict=True)
    return vae


# ---------------------------------------------------------------------------------------------------------------------
# Frame counts and shapes


def temporal_compression(vae: AutoencoderKLCogVideoX) -> int:
    return int(vae.config.temporal_compression_ratio)


def spatial_compression(vae: AutoencoderKLCogVideoX) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_num_frames(num_frames: int, temporal_ratio: int = 4) -> None:
    """Raise ``ValueError`` unless ``num_frames`` is 1 (an image) or ``1 + temporal_ratio * k`` (a video)."""
    if num_frames < 1 or (num_frames - 1) % temporal_ratio:
        below = 1 + temporal_ratio * max(0, (num_frames - 1) // temporal_ratio)
        raise ValueError(
            f"num_frames: expected 1 (an image) or 1 + {temporal_ratio}k frames (1, {1 + temporal_ratio}, "
            f"{1 + 2 * temporal_ratio}, ...), got {num_frames}; trim the clip to {below} frames"
        )


def latent_num_frames(num_frames: int, temporal_ratio: int = 4) -> int:
    """Latent frames of a ``num_frames`` clip: ``1 + (T - 1) / temporal_ratio``."""
    check_num_frames(num_frames, temporal_ratio)
    return 1 + (num_frames - 1) // temporal_ratio


def pixel_num_frames(latent_frames: int, temporal_ratio: int = 4) -> int:
    """Inverse of ``latent_num_frames``."""
    if latent_frames < 1:
        raise ValueError(f"latent_frames: expected >= 1, got {latent_frames}")
    return 1 + (latent_frames - 1) * temporal_ratio


def _as_clip(pixels: torch.Tensor, vae: AutoencoderKLCogVideoX) -> torch.Tensor:
    """``(B, 3, H, W)`` images or ``(B, 3, T, H, W)`` clips -> checked ``(B, 3, T, H, W)``."""
    if pixels.ndim == 4:
        pixels = pixels.unsqueeze(2)  # (B, 3, 1, H, W): an image is a 1-frame clip
    channels = int(vae.config.in_channels)
    if pixels.ndim != 5 or pixels.shape[1] != channels:
        raise ValueError(
            f"pixels: expected (B, {channels}, H, W) images or (B, {channels}, T, H, W) clips, got {tuple(pixels.shape)}"
        )
    check_num_frames(pixels.shape[2], temporal_compression(vae))
    factor = spatial_compression(vae)
    if pixels.shape[-2] % factor or pixels.shape[-1] % factor:
        raise ValueError(f"pixels: expected H and W divisible by {factor}, got {tuple(pixels.shape[-2:])}")
    return pixels


# ---------------------------------------------------------------------------------------------------------------------
# Latent normalisation


def latent_normalization(vae: AutoencoderKLCogVideoX) -> tuple[float, float]:
    """``(shift, scale)`` from the config (``shift_factor`` None counts as 0)."""
    shift = vae.config.shift_factor
    return (0.0 if shift is None else float(shift)), float(vae.config.scaling_factor)


def normalize_latents(latents: torch.Tensor, vae: AutoencoderKLCogVideoX) -> torch.Tensor:
    """VAE latents -> DiT latents: ``(z - shift) * scale``."""
    shift, scale = latent_normalization(vae)
    return (latents - shift) * scale


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLCogVideoX) -> torch.Tensor:
    """DiT latents -> VAE latents: ``z / scale + shift``."""
    shift, scale = latent_normalization(vae)
    return latents / scale + shift


def set_latent_normalization(vae: AutoencoderKLCogVideoX, shift: float, scale: float) -> None:
    """Store ``(shift, scale)`` in the config so ``save_pretrained`` writes them."""
    if not scale > 0:
        raise ValueError(f"scale: expected > 0, got {scale}")
    vae.register_to_config(shift_factor=float(shift), scaling_factor=float(scale))


# ---------------------------------------------------------------------------------------------------------------------
# Encode / decode


def posterior(vae: AutoencoderKLCogVideoX, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    """Posterior ``q(z | x)`` of images ``(B, 3, H, W)`` or clips ``(B, 3, T, H, W)`` in ``[-1, 1]``.

    Args:
        vae: an ST-VAE (``AutoencoderKLSTVAE``; a plain ``AutoencoderKLCogVideoX`` uses diffusers' frame batching).
        pixels: images or ``1 + 4k``-frame clips; H and W divisible by 8.
    """
    return vae.encode(_as_clip(pixels, vae).to(dtype=vae.dtype)).latent_dist


def encode_frames(
    vae: AutoencoderKLCogVideoX,
    pixels: torch.Tensor,
    mode: Literal["sample", "mode"] = "sample",
    generator: torch.Generator | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Encode images/clips in ``[-1, 1]`` to latents ``(B, C, 1 + (T - 1) / 4, H / 8, W / 8)``.

    Args:
        vae: an ST-VAE.
        pixels: ``(B, 3, H, W)`` images (one latent frame each) or ``(B, 3, T, H, W)`` clips with ``T = 1 + 4k``.
        mode: ``"sample"`` draws from the posterior (LaVin's choice), ``"mode"`` takes its mean.
        generator: RNG for the posterior sample.
        normalize: apply ``(z - shift) * scale`` for the DiT.
    """
    if mode not in ("sample", "mode"):
        raise ValueError(f"mode: expected 'sample' or 'mode', got {mode!r}")
    distribution = posterior(vae, pixels)
    latents = distribution.sample(generator=generator) if mode == "sample" else distribution.mode()
    return normalize_latents(latents, vae) if normalize else latents


def decode_latents(
    vae: AutoencoderKLCogVideoX, latents: torch.Tensor, denormalize: bool = True, clamp: bool = False
) -> torch.Tensor:
    """Decode latents ``(B, C, t, h, w)`` to clips ``(B, 3, 1 + 4 (t - 1), 8 h, 8 w)`` (an image is ``T = 1``).

    Args:
        vae: an ST-VAE.
        latents: DiT latents (``denormalize=True``) or raw VAE latents.
        denormalize: undo ``normalize_latents`` first.
        clamp: clamp the output to ``[-1, 1]``.

    Raises:
        ValueError: bad latent shape, or a decoder that does not return ``1 + 4 (t - 1)`` frames (a plain
            ``AutoencoderKLCogVideoX`` with an even latent frame count).
    """
    channels = int(vae.config.latent_channels)
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise ValueError(f"latents: expected (B, {channels}, t, h, w), got {tuple(latents.shape)}")
    latents = denormalize_latents(latents, vae) if denormalize else latents
    pixels = vae.decode(latents.to(dtype=vae.dtype)).sample  # (B, 3, T, H, W)
    expected = pixel_num_frames(latents.shape[2], temporal_compression(vae))
    if pixels.shape[2] != expected:
        raise ValueError(
            f"vae: decoded {pixels.shape[2]} frames from {latents.shape[2]} latent frames, expected {expected}; "
            f"use AutoencoderKLSTVAE ({type(vae).__name__} upsamples even latent counts differently)"
        )
    return pixels.clamp(-1.0, 1.0) if clamp else pixels


@torch.no_grad()
def estimate_latent_normalization(
    vae: AutoencoderKLCogVideoX,
    batches: Iterable[torch.Tensor],
    mode: Literal["sample", "mode"] = "sample",
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """``(shift, scale)`` with ``shift`` = mean and ``scale`` = 1 / std of the raw latents of ``batches``.

    The official constants are global scalars (not per channel), so these are too. Pass them to
    ``set_latent_normalization``. Give a ``generator`` to keep the global RNG untouched (e.g. inside a checkpoint).
    """
    total, total_sq, count = 0.0, 0.0, 0
    for pixels in batches:
        latents = encode_frames(vae, pixels, mode=mode, generator=generator, normalize=False).double()
        total += float(latents.sum())
        total_sq += float((latents**2).sum())
        count += latents.numel()
    if count == 0:
        raise ValueError("batches: expected at least one batch of pixels, got none")
    mean = total / count
    std = max(total_sq / count - mean**2, 1e-12) ** 0.5
    return mean, 1.0 / std
