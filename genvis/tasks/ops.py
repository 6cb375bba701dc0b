"""Deterministic pixel operations that turn a source clip into an in-context (input, target) pair.

Every function takes and returns clips shaped ``(3, T, H, W)`` float in ``[-1, 1]`` (an image is ``T = 1``) unless its
docstring says otherwise, and is exact: the same input (and, for random ones, the same ``torch.Generator`` seed) gives
the same bits. Checked by ``tests/tasks/test_tasks.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights (what PIL's ``convert("L")`` uses).
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
# Number of grey levels of the depth-order map: procedural scenes hold at most 4 shapes (``num_shapes=(2, 4)``).
DEPTH_ORDER_LEVELS = 4


def check_clip(clip: torch.Tensor, name: str = "clip") -> None:
    """Raise ``ValueError`` unless ``clip`` is a float ``(3, T, H, W)`` tensor."""
    if not isinstance(clip, torch.Tensor) or clip.ndim != 4 or clip.shape[0] != 3 or not clip.is_floating_point():
        got = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"{name}: expected a float tensor shaped (3, T, H, W), got {got}")


def to_unit_range(array: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 frames -> ``(3, T, H, W)`` float32 in ``[-1, 1]``."""
    clip = torch.from_numpy(np.array(array, dtype=np.float32))  # (T, H, W, 3), a writable copy
    return clip.permute(3, 0, 1, 2).div(127.5).sub(1.0)  # (3, T, H, W)


def to_uint8(clip: torch.Tensor) -> np.ndarray:
    """``(3, T, H, W)`` float in ``[-1, 1]`` -> ``(T, H, W, 3)`` uint8 (for viewing and saving grids)."""
    check_clip(clip)
    return clip.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).cpu().numpy()


def resize_frames(clip: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of every frame to ``size`` (an int gives a square), clamped to ``[-1, 1]``."""
    check_clip(clip)
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    frames = clip.permute(1, 0, 2, 3)  # (T, 3, H, W)
    resized = F.interpolate(frames, size=out_size, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # (3, T, h, w)


def grayscale(clip: torch.Tensor) -> torch.Tensor:
    """BT.601 luma replicated over the 3 channels (the model's input and output stay RGB)."""
    check_clip(clip)
    weights = clip.new_tensor(LUMA_WEIGHTS).view(3, 1, 1, 1)
    luma = (clip * weights).sum(dim=0, keepdim=True)  # (1, T, H, W)
    return luma.expand(3, -1, -1, -1).contiguous()


def gaussian_blur(clip: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every frame (kernel radius ``ceil(3 sigma)``, reflect padding)."""
    check_clip(clip)
    if sigma <= 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=clip.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    frames = clip.permute(1, 0, 2, 3)  # (T, 3, H, W)
    if min(frames.shape[-2:]) <= radius:
        raise ValueError(f"clip: frames must be larger than the blur radius {radius}, got {tuple(frames.shape[-2:])}")
    padded = F.pad(frames, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1)
    blurred = F.conv2d(F.conv2d(padded, horizontal, groups=3), vertical, groups=3)  # (T, 3, H, W)
    return blurred.permute(1, 0, 2, 3).contiguous()


def down_up(clip: torch.Tensor, factor: int) -> torch.Tensor:
    """Antialiased bicubic downscale by ``factor`` then bicubic upscale back: the classic SR degradation."""
    check_clip(clip)
    height, width = clip.shape[-2:]
    if factor < 2 or height % factor or width % factor:
        raise ValueError(f"factor: expected an int >= 2 dividing the frame size {height}x{width}, got {factor}")
    small = resize_frames(clip, (height // factor, width // factor))
    frames = small.permute(1, 0, 2, 3)  # (T, 3, h, w)
    restored = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False)
    return restored.clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def add_gaussian_noise(clip: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``clip + sigma * N(0, 1)`` with noise drawn from a ``torch.Generator`` seeded with ``seed``, clamped."""
    check_clip(clip)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clip.shape, generator=generator, dtype=clip.dtype)
    return (clip + sigma * noise).clamp(-1.0, 1.0)


def fill_box(clip: torch.Tensor, box: tuple[int, int, int, int], value: float = 0.0) -> torch.Tensor:
    """Copy of ``clip`` with the pixels of ``box = (top, left, height, width)`` set to ``value`` on every frame."""
    check_clip(clip)
    top, left, box_height, box_width = box
    filled = clip.clone()
    filled[:, :, top : top + box_height, left : left + box_width] = value
    return filled


def canny_edges(clip: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Binary Canny edges (scikit-image, default hysteresis thresholds) of each frame's luma: edge = 1, else -1."""
    check_clip(clip)
    from skimage.feature import canny

    luma = grayscale(clip)[0].add(1.0).mul(0.5).double().numpy()  # (T, H, W) in [0, 1]
    edges = np.stack([canny(frame, sigma=sigma) for frame in luma])  # (T, H, W) bool
    return binary_map(torch.from_numpy(edges))


def binary_map(mask: torch.Tensor) -> torch.Tensor:
    """``(T, H, W)`` bool mask -> ``(3, T, H, W)`` float map, white (1) where True and black (-1) elsewhere."""
    if mask.ndim != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a (T, H, W) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    return mask.float().mul(2.0).sub(1.0).unsqueeze(0).expand(3, -1, -1, -1).contiguous()


def decode_binary_map(clip: torch.Tensor) -> torch.Tensor:
    """Inverse of ``binary_map`` for a predicted map: channel-mean > 0 -> ``(T, H, W)`` bool."""
    check_clip(clip)
    return clip.mean(dim=0) > 0


def depth_order_map(layer_ids: torch.Tensor, levels: int = DEPTH_ORDER_LEVELS) -> torch.Tensor:
    """Front-most layer per pixel -> grey map: background black (-1), layer ``k`` at ``-1 + 2 k / levels``.

    Brighter is nearer, like a disparity map. The scale is absolute (not per image) so a context pair fixes it.
    """
    if layer_ids.ndim != 3 or layer_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"layer_ids: expected a (T, H, W) integer tensor, got {tuple(layer_ids.shape)} {layer_ids.dtype}"
        )
    if int(layer_ids.min()) < 0 or int(layer_ids.max()) > levels:
        raise ValueError(
            f"layer_ids: expected values in [0, {levels}], got [{int(layer_ids.min())}, {int(layer_ids.max())}]"
        )
    grey = layer_ids.float().mul(2.0 / levels).sub(1.0)  # (T, H, W)
    return grey.unsqueeze(0).expand(3, -1, -1, -1).contiguous()


def decode_depth_order(clip: torch.Tensor, levels: int = DEPTH_ORDER_LEVELS) -> torch.Tensor:
    """Inverse of ``depth_order_map`` for a predicted map: nearest level of the channel mean -> ``(T, H, W)`` int64."""
    check_clip(clip)
    return clip.mean(dim=0).add(1.0).mul(levels / 2.0).round().clamp(0, levels).long()
