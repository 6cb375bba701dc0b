"""Optimizers for the train scripts: AdamW and SGD-SaI, plus optimizer-state memory accounting.

SGD-SaI (Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All You Need", arXiv 2412.11768) is SGD
with momentum whose learning rate is scaled per parameter block (one tensor) by the gradient signal-to-noise ratio
measured once, when the block first receives a gradient: ``g-SNR = ||g||_2 / (std(g) + eps)``. The scale is frozen
from then on, so the optimizer keeps a single momentum buffer per parameter (plus one scalar) instead of AdamW's two
moment buffers: about half the optimizer-state memory, and no per-step second-moment work.

Update (per block, decoupled weight decay as in AdamW)::

    m <- g                                 (first update)
    m <- momentum * m + (1 - momentum) * g (afterwards)
    p <- p * (1 - lr * weight_decay) - lr * gsnr * m

One deliberate difference from the reference code: adaLN-zero DiTs (LaVin-DiT, MVDiT) zero-initialise their gates, so
many blocks get an all-zero gradient at step 1; the reference code would give them ``g-SNR = 0`` and never train
them. Here a block's scale is measured at the first step where its gradient is non-zero (until then the block is left
untouched, as plain SGD would leave it). Blocks with no spread to measure (one element, or a constant gradient) get
the neutral scale 1 (the reference code would divide by ``eps``).

Tests: tests/efficiency/test_sgd_sai.py. Memory comparison: benchmarks/optimizer_memory.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "OPTIMIZER_NAMES",
    "SGDSaI",
    "build_optimizer",
    "expected_state_bytes",
    "gradient_snr",
    "optimizer_state_bytes",
]

OPTIMIZER_NAMES = ("adamw", "sgd_sai")


@torch.no_grad()
def gradient_snr(grad: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gradient signal-to-noise ratio of one parameter block: ``||g||_2 / (std(g) + eps)`` (fp32 scalar).

    A block with no spread to measure (fewer than two elements, or a constant gradient) gets the neutral scale 1; the
    formula would otherwise divide by ``eps``.
    """
    grad = grad.float()
    if grad.numel() < 2:
        return torch.ones((), device=grad.device)
    std = grad.std()
    if not bool(std > 0):
        return torch.ones((), device=grad.device)
    return grad.norm() / (std + eps)


class SGDSaI(torch.optim.Optimizer):
    """SGD with momentum and a per-block learning-rate scale fixed at the block's first non-zero gradient.

    Args:
        params: parameters or parameter-group dicts.
        lr: base learning rate (the effective step of a block is ``lr * g-SNR``; g-SNR is of order ``sqrt(numel)``
            for noise-dominated blocks, so tune it separately from AdamW's).
        momentum: EMA coefficient of the momentum buffer, in [0, 1).
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``).
        eps: added to the gradient standard deviation.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr: expected >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        if not eps > 0.0:
            raise ValueError(f"eps: expected > 0, got {eps}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eps": eps})

    def scales(self) -> dict[torch.Tensor, float]:
        """The frozen g-SNR scale of every block measured so far (parameter -> scale)."""
        return {p: float(s["gsnr"]) for p, s in self.state.items() if "gsnr" in s}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ValueError("SGDSaI does not support sparse gradients")
                state = self.state[param]
                if "gsnr" not in state:
                    if not bool(grad.any()):
                        continue  # no signal yet (e.g. behind a zero-initialised gate): measure it later
                    state["gsnr"] = gradient_snr(grad, group["eps"])
                    state["momentum_buffer"] = grad.detach().clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(grad, alpha=1.0 - momentum)
                if decay:
                    param.mul_(1.0 - lr * decay)
                param.add_(state["momentum_buffer"], alpha=-lr * float(state["gsnr"]))
        return loss


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    momentum: float = 0.9,
    eps: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer a train script's ``optim.name`` selects.

    Args:
        name: ``"adamw"`` (``torch.optim.AdamW``) or ``"sgd_sai"`` (:class:`SGDSaI`).
        params: parameters or parameter groups.
        lr: learning rate (for SGD-SaI the base rate multiplied by each block's g-SNR).
        weight_decay: decoupled weight decay.
        betas: AdamW moment coefficients.
        momentum: SGD-SaI momentum.
        eps: numerical epsilon (default: 1e-8 for both).
    """
    if name == "adamw":
        if len(betas) != 2:
            raise ValueError(f"optim.betas: expected two values, got {list(betas)}")
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps or 1e-8)
    if name == "sgd_sai":
        return SGDSaI(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps or 1e-8)
    raise ValueError(f"optim.name: expected one of {list(OPTIMIZER_NAMES)}, got {name!r}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (moment buffers, step counters, scales)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def expected_state_bytes(name: str, parameters: Iterable[torch.Tensor] | nn.Module) -> int:
    """Optimizer-state bytes once every parameter has been stepped, from shapes alone (works on the meta device).

    AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter dtype plus a fp32 ``step`` per tensor; SGD-SaI keeps
    one momentum buffer plus a fp32 g-SNR scalar per tensor.
    """
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    params = [p for p in parameters if p.requires_grad]
    buffers = {"adamw": 2, "sgd_sai": 1}
    if name not in buffers:
        raise ValueError(f"name: expected one of {list(OPTIMIZER_NAMES)}, got {name!r}")
    return sum(buffers[name] * p.numel() * p.element_size() + 4 for p in params)
