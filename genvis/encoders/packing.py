"""Native-resolution patchify and packing for the shared ViT encoder.

Images ``(C, H, W)`` and clips ``(T, C, H, W)`` (tensors or PIL images) are resized only where asked, cut into patches
and concatenated into one packed ``(N, C * pt * p * p)`` tensor with a ``grid_thw`` row per item, the Qwen2-VL input
convention. Patch vectors are channel-major ``(C, pt, ph, pw)``, the order of a flattened conv kernel. With
``merge_size > 1`` the tokens of each frame are listed block-major (for each ``m x m`` merge window in row-major order,
its patches in row-major order), so a 2x2 merger reads 4 consecutive tokens; :func:`token_coordinates` gives every
token's ``(t, h, w)`` and :func:`tokens_to_grids` undoes the blocking for dense maps.

Resizing follows the published processors (re-implemented, no hub processor needed):
- ``"smart"``: Qwen2-VL ``smart_resize``: sides rounded to multiples of ``patch * merge``, pixel count kept within a
  token budget, aspect ratio kept.
- ``"naflex"``: SigLIP 2 NaFlex: the largest scale whose ``ceil``-ed patch grid fits ``max_num_patches``.
- ``"none"``: native size; a side that is not a multiple of ``patch * merge`` or an image over the budget is an error.

Checked by tests/encoders/test_vit_packing.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from genvis.layers import cu_seqlens_from_lengths

__all__ = [
    "NativeResolutionProcessor",
    "PackedVisionInput",
    "naflex_size",
    "patchify_frames",
    "smart_resize",
    "token_coordinates",
    "tokens_to_grids",
]

ResizeMode = Literal["none", "smart", "naflex"]


@dataclass
class PackedVisionInput:
    """A packed batch of images/clips for :class:`genvis.encoders.VisionTransformerModel`.

    Args:
        pixel_values: ``(N, C * pt * p * p)`` patch vectors of all items back to back.
        grid_thw: ``(num_items, 3)`` long, the ``(t, h, w)`` patch grid of each item.
        cu_seqlens: ``(num_items + 1,)`` int32 item boundaries in ``pixel_values``.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_items(self) -> int:
        return int(self.grid_thw.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedVisionInput:
        return PackedVisionInput(
            self.pixel_values.to(device=device, dtype=dtype), self.grid_thw.to(device), self.cu_seqlens.to(device)
        )


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """Qwen2-VL resize rule: sides become multiples of ``factor``, ``min_pixels <= h * w <= max_pixels``.

    Args:
        height: input height in pixels.
        width: input width in pixels.
        factor: side granularity (``patch_size * merge_size``).
        min_pixels: lower bound on the output pixel count.
        max_pixels: upper bound on the output pixel count.
        max_aspect_ratio: longer/shorter side limit; a thinner image is rejected.

    Returns:
        ``(new_height, new_width)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise ValueError(
            f"aspect ratio of a {height}x{width} image is {max(height, width) / min(height, width):.1f}, over the "
            f"limit max_aspect_ratio={max_aspect_ratio}"
        )
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is smaller than one {factor}x{factor} unit")
    # a side can round to 0 here; the min_pixels branch then regrows it (the reference rule, kept for parity)
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        # shrink both sides by the same factor, rounding down so the budget holds
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """SigLIP 2 NaFlex size: the largest scale ``s`` with ``ceil(H s / p) * ceil(W s / p) <= max_num_patches``.

    Each side keeps at least one patch. A deterministic bisection on ``s`` (same tolerance as the reference
    processor, 1e-5).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_num_patches < 1:
        raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")

    def scaled(scale: float) -> tuple[int, int]:
        side_h = max(patch_size, math.ceil(height * scale / patch_size) * patch_size)
        side_w = max(patch_size, math.ceil(width * scale / patch_size) * patch_size)
        return side_h, side_w

    eps = 1e-5
    low, high = eps / 10, 100.0
    while high - low >= eps:
        mid = (low + high) / 2
        side_h, side_w = scaled(mid)
        if (side_h // patch_size) * (side_w // patch_size) <= max_num_patches:
            low = mid
        else:
            high = mid
    return scaled(low)


def patchify_frames(
    frames: torch.Tensor, patch_size: int, temporal_patch_size: int = 1, merge_size: int = 1
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut ``(T, C, H, W)`` frames into ``(t * h * w, C * pt * p * p)`` patch vectors.

    A frame count that is not a multiple of ``temporal_patch_size`` is padded by repeating the last frame (a single
    image becomes ``pt`` identical frames, as in Qwen2-VL). Tokens are block-major for ``merge_size > 1``.

    Returns:
        ``(patches, (t, h, w))``.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, C, H, W), got shape {tuple(frames.shape)}")
    T, C, H, W = frames.shape
    unit = patch_size * merge_size
    if H % unit or W % unit:
        raise ValueError(f"frame size {H}x{W} must be a multiple of patch_size * merge_size = {unit}")
    if T % temporal_patch_size:
        pad = temporal_patch_size - T % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, C, H, W)], dim=0)
        T = frames.shape[0]
    t, h, w = T // temporal_patch_size, H // patch_size, W // patch_size
    m, p, pt = merge_size, patch_size, temporal_patch_size
    # (T, C, H, W) -> (t, pt, C, h/m, m, p, w/m, m, p)
    x = frames.reshape(t, pt, C, h // m, m, p, w // m, m, p)
    # -> (t, h/m, w/m, m, m, C, pt, p, p): merge windows row-major, patches row-major inside, channel-major vectors
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * pt * p * p), (t, h, w)


def token_coordinates(grid_thw: torch.Tensor, merge_size: int = 1) -> torch.Tensor:
    """``(t, h, w)`` coordinate of every packed token (in packing order), shape ``(N, 3)`` long."""
    coords = []
    for t, h, w in grid_thw.tolist():
        m = merge_size
        hh = torch.arange(h, device=grid_thw.device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        ww = torch.arange(w, device=grid_thw.device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        # block-major: (h/m, w/m, m, m)
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        tt = torch.arange(t, device=grid_thw.device).repeat_interleave(h * w)
        coords.append(torch.stack([tt, hh.repeat(t), ww.repeat(t)], dim=-1))
    return torch.cat(coords, dim=0)


def tokens_to_grids(tokens: torch.Tensor, grid_thw: torch.Tensor, merge_size: int = 1) -> list[torch.Tensor]:
    """Split packed per-patch ``tokens (N, D)`` into one raster ``(t, h, w, D)`` map per item (undoes the blocking)."""
    lengths = (grid_thw.prod(-1)).tolist()
    if sum(lengths) != tokens.shape[0]:
        raise ValueError(f"grid_thw covers {sum(lengths)} tokens, got {tokens.shape[0]}")
    maps = []
    for item, (t, h, w) in zip(tokens.split(lengths), grid_thw.tolist()):
        m = merge_size
        # (t, h/m, w/m, m, m, D) -> (t, h/m, m, w/m, m, D)
        grid = item.reshape(t, h // m, w // m, m, m, -1).permute(0, 1, 3, 2, 4, 5)
        maps.append(grid.reshape(t, h, w, -1))
    return maps


def _to_frames(image, index: int) -> torch.Tensor:
    """PIL image, ``(C, H, W)`` or ``(T, C, H, W)`` tensor/array -> float ``(T, C, H, W)`` (uint8 scaled to [0, 1])."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not torch.is_tensor(image):
        raise ValueError(f"item {index}: expected a tensor, array or PIL image, got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"item {index}: expected (C, H, W) or (T, C, H, W), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise ValueError(f"item {index}: expected uint8 or float pixels, got {image.dtype}")
    return image.float()


class NativeResolutionProcessor:
    """Turns a list of images/clips into a :class:`PackedVisionInput` at native (or budgeted) resolution.

    Args:
        patch_size: spatial patch side.
        temporal_patch_size: frames per patch (2 for Qwen2-VL; images are repeated to fill it).
        merge_size: side of the merge window; tokens are listed block-major and sides must be multiples of
            ``patch_size * merge_size``.
        in_channels: expected channel count.
        resize_mode: ``"none"`` (native, errors on bad sizes), ``"smart"`` (Qwen2-VL) or ``"naflex"`` (SigLIP 2).
        min_num_patches: lower token budget per item for ``"smart"`` (spatial patches per frame).
        max_num_patches: upper token budget per item (spatial patches per frame); ``"none"`` raises above it.
        max_total_patches: budget for the whole packed batch (all frames); exceeding it is an error.
        image_mean: per-channel mean subtracted after scaling to [0, 1]; None skips normalisation.
        image_std: per-channel std.
        resample: interpolation used by the resize modes.
    """

    def __init__(
        self,
        patch_size: int = 16,
        temporal_patch_size: int = 1,
        merge_size: int = 1,
        in_channels: int = 3,
        resize_mode: ResizeMode = "none",
        min_num_patches: int | None = None,
        max_num_patches: int | None = None,
        max_total_patches: int | None = None,
        image_mean: list[float] | tuple[float, ...] | None = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] | None = (0.5, 0.5, 0.5),
        resample: Literal["bicubic", "bilinear"] = "bicubic",
    ) -> None:
        if resize_mode not in ("none", "smart", "naflex"):
            raise ValueError(f"resize_mode must be 'none', 'smart' or 'naflex', got {resize_mode!r}")
        if resize_mode == "naflex" and merge_size != 1:
            raise ValueError(f"resize_mode='naflex' needs merge_size=1, got {merge_size}")
        if resize_mode != "none" and max_num_patches is None:
            raise ValueError(f"resize_mode={resize_mode!r} needs max_num_patches (the per-item token budget)")
        if image_mean is not None and (image_std is None or not len(image_mean) == len(image_std) == in_channels):
            raise ValueError(
                f"image_mean/image_std must both have in_channels={in_channels} entries, got {image_mean} / {image_std}"
            )
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.in_channels, self.resize_mode, self.resample = in_channels, resize_mode, resample
        self.min_num_patches = min_num_patches or merge_size * merge_size
        self.max_num_patches, self.max_total_patches = max_num_patches, max_total_patches
        self.image_mean = None if image_mean is None else torch.tensor(image_mean).view(1, -1, 1, 1)
        self.image_std = None if image_std is None else torch.tensor(image_std).view(1, -1, 1, 1)

    @classmethod
    def from_model(cls, model, **kwargs) -> NativeResolutionProcessor:
        """A processor matching a :class:`VisionTransformerModel`'s patch/merge/channel settings."""
        config = model.config
        defaults = {
            "patch_size": config.patch_size,
            "temporal_patch_size": config.temporal_patch_size,
            "merge_size": config.spatial_merge_size,
            "in_channels": config.in_channels,
        }
        return cls(**{**defaults, **kwargs})

    def target_size(self, height: int, width: int, index: int = 0) -> tuple[int, int]:
        """Output size of one item under the resize mode (raises for inputs that mode cannot handle)."""
        p, unit = self.patch_size, self.patch_size * self.merge_size
        if self.resize_mode == "smart":
            return smart_resize(height, width, unit, self.min_num_patches * p * p, self.max_num_patches * p * p)
        if self.resize_mode == "naflex":
            return naflex_size(height, width, p, self.max_num_patches)
        if height < p or width < p:
            raise ValueError(
                f"item {index}: image of {height}x{width} pixels is smaller than one {p}x{p} patch; upscale it or use "
                f"resize_mode='smart'/'naflex'"
            )
        if height % unit or width % unit:
            raise ValueError(
                f"item {index}: size {height}x{width} is not a multiple of patch_size * merge_size = {unit}; resize or "
                f"crop it, or use resize_mode='smart'"
            )
        num = (height // p) * (width // p)
        if self.max_num_patches is not None and num > self.max_num_patches:
            raise ValueError(
                f"item {index}: {height}x{width} gives {num} patches, over max_num_patches={self.max_num_patches}; "
                f"downscale it or use resize_mode='smart' to fit the budget"
            )
        return height, width

    def __call__(self, images) -> PackedVisionInput:
        """Args:
        images: one item or a list of items; each a PIL image, a ``(C, H, W)`` image or a ``(T, C, H, W)``
            clip (uint8 in [0, 255] or float in [0, 1]).
        """
        if (torch.is_tensor(images) and images.ndim in (3, 4)) or hasattr(images, "convert"):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of images/clips")
        patches, grids = [], []
        for index, image in enumerate(images):
            frames = _to_frames(image, index)
            if frames.shape[1] != self.in_channels:
                raise ValueError(
                    f"item {index}: expected {self.in_channels} channels (C in (T, C, H, W)), got {frames.shape[1]} "
                    f"(shape {tuple(frames.shape)})"
                )
            height, width = frames.shape[-2:]
            new_h, new_w = self.target_size(height, width, index)
            if (new_h, new_w) != (height, width):
                frames = F.interpolate(
                    frames, size=(new_h, new_w), mode=self.resample, align_corners=False, antialias=True
                )
            if self.image_mean is not None:
                frames = (frames - self.image_mean) / self.image_std
            item_patches, grid = patchify_frames(frames, self.patch_size, self.temporal_patch_size, self.merge_size)
            patches.append(item_patches)
            grids.append(grid)
        grid_thw = torch.tensor(grids, dtype=torch.long)
        total = int(grid_thw.prod(-1).sum())
        if self.max_total_patches is not None and total > self.max_total_patches:
            raise ValueError(
                f"the batch has {total} patches, over max_total_patches={self.max_total_patches}; split it into "
                f"smaller batches or lower max_num_patches"
            )
        lengths = grid_thw.prod(-1)
        return PackedVisionInput(torch.cat(patches, dim=0), grid_thw, cu_seqlens_from_lengths(lengths))
