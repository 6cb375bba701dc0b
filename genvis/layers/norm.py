"""Normalisation layers: RMSNorm (fp32 statistics) and adaLN modulation variants.

adaLN variants:
- ``"shift_scale_gate"`` (DiT adaLN-Zero): per branch ``x * (1 + scale) + shift`` before, ``gate * out`` after.
- ``"scale_tanh_gate"`` (LaVin-DiT / Lumina-Next): per branch ``x * (1 + scale)`` before, ``tanh(gate) * out`` after.
The projection producing the chunks is zero-initialised so every block starts as the identity map.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaLNModulation", "RMSNorm", "modulate"]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 and cast back (bf16 statistics drift)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        out = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), weight, self.eps)
        return out.to(hidden_states.dtype)


def modulate(hidden_states: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``x * (1 + scale) + shift``; ``scale``/``shift`` are broadcast against ``x`` (add the sequence axis yourself)."""
    out = hidden_states * (1 + scale)
    return out if shift is None else out + shift


class AdaLNModulation(nn.Module):
    """Conditioning MLP producing the per-branch modulation parameters.

    Args:
        cond_dim: width of the conditioning vector (timestep embedding).
        dim: width of the modulated stream.
        num_branches: number of residual branches modulated (2 for attention + MLP).
        mode: ``"shift_scale_gate"`` (3 chunks per branch) or ``"scale_tanh_gate"`` (2 chunks per branch).
    """

    def __init__(
        self,
        cond_dim: int,
        dim: int,
        num_branches: int = 2,
        mode: Literal["shift_scale_gate", "scale_tanh_gate"] = "shift_scale_gate",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("shift_scale_gate", "scale_tanh_gate"):
            raise ValueError(f"mode must be 'shift_scale_gate' or 'scale_tanh_gate', got {mode!r}")
        self.mode, self.num_branches = mode, num_branches
        self.chunks_per_branch = 3 if mode == "shift_scale_gate" else 2
        self.act = nn.SiLU()
        self.linear = nn.Linear(cond_dim, num_branches * self.chunks_per_branch * dim, bias=bias)
        # zero-init: scale=shift=gate=0 makes each residual branch vanish at init (adaLN-Zero)
        nn.init.zeros_(self.linear.weight)
        if bias:
            nn.init.zeros_(self.linear.bias)

    def forward(self, cond: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """Returns one ``(shift, scale, gate)`` triple per branch; ``shift`` is None in scale-only mode and ``gate`` is
        already passed through tanh there. Each tensor has ``cond``'s leading shape and width ``dim``."""
        params = self.linear(self.act(cond)).chunk(self.num_branches * self.chunks_per_branch, dim=-1)
        branches = []
        for i in range(self.num_branches):
            group = params[i * self.chunks_per_branch : (i + 1) * self.chunks_per_branch]
            if self.mode == "shift_scale_gate":
                shift, scale, gate = group
                branches.append((shift, scale, gate))
            else:
                scale, gate = group
                branches.append((None, scale, torch.tanh(gate)))
        return branches
