"""Patch embedding for images (2D) and clips (3D), patchify/unpatchify, and embedding of pre-cut packed patches.

Patch vectors are flattened channel-major ``(C, [pt,] ph, pw)``, the order of a flattened conv kernel, so
``PatchEmbed.forward_patches`` on :func:`patchify` output equals the conv path exactly (tests/layers/test_layers.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchEmbed", "patchify", "unpatchify"]


def _as_patch(patch_size: int | tuple[int, ...] | list[int], ndim: int) -> tuple[int, ...]:
    if isinstance(patch_size, int):
        return (patch_size,) * ndim
    patch_size = tuple(patch_size)
    if len(patch_size) != ndim:
        raise ValueError(f"patch_size {patch_size} must have {ndim} entries for {ndim}-D input")
    return patch_size


def patchify(x: torch.Tensor, patch_size: int | tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Cut ``(B, C, H, W)`` or ``(B, C, T, H, W)`` into ``(B, N, C*prod(patch))`` patches; returns (patches, grid)."""
    spatial = x.shape[2:]
    patch = _as_patch(patch_size, len(spatial))
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"input size {tuple(spatial)} is not divisible by patch size {patch}")
    grid = tuple(s // p for s, p in zip(spatial, patch))
    B, C = x.shape[:2]
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...)
    x = x.reshape(B, C, *[v for g, p in zip(grid, patch) for v in (g, p)])
    n = len(grid)
    perm = [0, *[2 + 2 * i for i in range(n)], 1, *[3 + 2 * i for i in range(n)]]
    x = x.permute(*perm).reshape(B, math.prod(grid), C * math.prod(patch))
    return x, grid


def unpatchify(tokens: torch.Tensor, grid: tuple[int, ...], patch_size: int | tuple[int, ...], channels: int):
    """Inverse of :func:`patchify`: ``(B, N, C*prod(patch))`` -> ``(B, C, *spatial)``."""
    patch = _as_patch(patch_size, len(grid))
    B, N, width = tokens.shape
    if math.prod(grid) != N or width != channels * math.prod(patch):
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not match grid {tuple(grid)} x patch {patch} x {channels} channels"
        )
    n = len(grid)
    x = tokens.reshape(B, *grid, channels, *patch)  # (B, g0, g1, .., C, p0, p1, ..)
    perm = [0, n + 1, *[v for i in range(n) for v in (1 + i, n + 2 + i)]]
    x = x.permute(*perm)  # (B, C, g0, p0, g1, p1, ...)
    return x.reshape(B, channels, *[g * p for g, p in zip(grid, patch)])


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, 2D (``patch_size`` of 2 ints) or 3D (3 ints: time, height, width).

    Args:
        in_channels: input channels.
        dim: embedding width.
        patch_size: int (2D square) or tuple ``(ph, pw)`` / ``(pt, ph, pw)``.
        bias: conv bias.
    """

    def __init__(
        self, in_channels: int, dim: int, patch_size: int | tuple[int, ...] | list[int] = 2, bias: bool = True
    ):
        super().__init__()
        self.patch_size = _as_patch(patch_size, 2) if isinstance(patch_size, int) else tuple(patch_size)
        if len(self.patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 entries, got {self.patch_size}")
        conv = nn.Conv2d if len(self.patch_size) == 2 else nn.Conv3d
        self.in_channels, self.dim = in_channels, dim
        self.proj = conv(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * math.prod(self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(B, C, H, W)`` / ``(B, C, T, H, W)`` -> ``(B, N, dim)`` row-major tokens and their grid."""
        if x.ndim != 2 + len(self.patch_size):
            raise ValueError(f"expected a {2 + len(self.patch_size)}-D input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        spatial = x.shape[2:]
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(f"input size {tuple(spatial)} is not divisible by patch size {self.patch_size}")
        x = self.proj(x)  # (B, dim, *grid)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Embed pre-cut patches ``(..., C*prod(patch))`` (packed native-resolution input) -> ``(..., dim)``."""
        if patches.shape[-1] != self.patch_dim:
            raise ValueError(f"patch vectors must have {self.patch_dim} values, got {patches.shape[-1]}")
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
