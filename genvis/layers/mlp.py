"""Feed-forward blocks: SwiGLU (LaVin-DiT, Qwen2.5-VL, Llama) and GELU MLP (ViT, DiT)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GELUMLP", "SwiGLU", "swiglu_hidden_dim"]


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
    """Llama-style hidden width: 2/3 of ``mlp_ratio * dim`` (same parameter count as a GELU MLP), rounded up."""
    hidden = int(2 * mlp_ratio * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``.

    Args:
        dim: input/output width.
        hidden_dim: inner width.
        bias: biases on the three projections.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(hidden_states)) * self.w3(hidden_states))


class GELUMLP(nn.Module):
    """``fc2(gelu(fc1 x))``.

    Args:
        dim: input/output width.
        hidden_dim: inner width.
        approximate: ``"tanh"`` (DiT, SigLIP) or ``"none"`` (ViT, CLIP uses quick-gelu: pass ``"quick"``).
        bias: biases on both projections.
    """

    def __init__(
        self, dim: int, hidden_dim: int, approximate: Literal["none", "tanh", "quick"] = "none", bias: bool = True
    ) -> None:
        super().__init__()
        if approximate not in ("none", "tanh", "quick"):
            raise ValueError(f"approximate must be 'none', 'tanh' or 'quick', got {approximate!r}")
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.approximate == "quick":
            hidden_states = hidden_states * torch.sigmoid(1.702 * hidden_states)
        else:
            hidden_states = F.gelu(hidden_states, approximate=self.approximate)
        return self.fc2(hidden_states)
