"""n-D rotary position embeddings (1D text, 2D images, 3D video) driven by explicit position ids.

Each axis gets its own slice of the head dimension (``axes_dim``, summing to ``head_dim``); positions come as
``(..., n_axes)`` ids, so packed sequences of different grids simply concatenate their ids (see
:func:`grid_position_ids`). The rotation pairs either the two halves of the head dimension (``interleaved=False``,
the transformers/Qwen2-VL layout; LaVin-DiT's official code rotates halves within each axis slice, see
genvis/models/lavin_dit.py) or neighbouring channels (``interleaved=True``, the complex-number layout of Lumina). Checked by the relative-position test in tests/layers/test_rope.py: the q.k score depends only
on the position difference.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary_emb", "grid_position_ids"]


def grid_position_ids(
    grid: tuple[int, ...] | list[int], device: torch.device | None = None, offset: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Integer positions of a row-major ``(t, h, w)`` (or any n-D) token grid, shape ``(prod(grid), len(grid))``."""
    axes = [torch.arange(n, device=device) for n in grid]
    ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
    if offset is not None:
        ids = ids + torch.as_tensor(offset, device=device)
    return ids


class RotaryEmbedding(nn.Module):
    """Rotary frequencies for n-D positions.

    Args:
        head_dim: per-head width the rotation is applied to.
        axes_dim: channels given to each position axis, e.g. ``[head_dim]`` (1D), ``[d_h, d_w]`` (2D),
            ``[d_t, d_h, d_w]`` (3D). Each must be even; they must sum to ``head_dim``.
        theta: base of the geometric frequency ladder.
        interleaved: rotate neighbouring channel pairs instead of the two halves.
    """

    def __init__(
        self, head_dim: int, axes_dim: list[int] | tuple[int, ...], theta: float = 10000.0, interleaved: bool = False
    ) -> None:
        super().__init__()
        axes_dim = list(axes_dim)
        if sum(axes_dim) != head_dim:
            raise ValueError(f"axes_dim {axes_dim} must sum to head_dim={head_dim}, got {sum(axes_dim)}")
        if any(d % 2 for d in axes_dim):
            raise ValueError(f"every entry of axes_dim must be even, got {axes_dim}")
        self.head_dim, self.axes_dim, self.theta, self.interleaved = head_dim, axes_dim, theta, interleaved
        inv_freqs = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes_dim]
        # float64 at build time only: the ladder is exact, the buffer is fp32 and not saved with the weights
        self.register_buffer("inv_freq", torch.cat(inv_freqs).float(), persistent=False)
        self.register_buffer(
            "axis_index",
            torch.cat([torch.full((d // 2,), i, dtype=torch.long) for i, d in enumerate(axes_dim)]),
            persistent=False,
        )

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            position_ids: ``(..., S, n_axes)`` integer or fractional positions.

        Returns:
            ``(cos, sin)``, each ``(..., S, head_dim)`` in fp32, laid out for :func:`apply_rotary_emb`.
        """
        if position_ids.shape[-1] != len(self.axes_dim):
            raise ValueError(
                f"position_ids last dim must be the number of axes ({len(self.axes_dim)}), got {position_ids.shape[-1]}"
            )
        positions = position_ids.float()[..., self.axis_index]  # (..., S, head_dim/2)
        angles = positions * self.inv_freq
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x_even, x_odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., S, H, D)`` by ``cos``/``sin`` of shape ``(..., S, D)`` (broadcast over heads).

    ``interleaved`` must match the :class:`RotaryEmbedding` that made the tables. Computed in fp32, cast back to
    ``x.dtype``.
    """
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"rotary table width {cos.shape[-1]} does not match head_dim {x.shape[-1]}")
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., S, 1, D)
    x_float = x.float()
    return (x_float * cos + _rotate(x_float, interleaved) * sin).to(x.dtype)
