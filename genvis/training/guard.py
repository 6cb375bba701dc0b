"""Non-finite loss / gradient guard: skip the optimizer step, count it, abort after K in a row.

``clip_grad_norm_`` returns a NaN norm but does not fix the gradients, and the optimizer then writes NaN into every
weight (specs/perf_reliability_ecosystem.md §B2). The guard's decision is reduced across ranks with MAX so every
rank skips the same steps and DDP replicas stay identical.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


class NonFiniteGuard:
    """Decides whether an optimizer step may be taken.

    Args:
        accelerator: used to agree on the decision across ranks.
        max_consecutive: abort after this many non-finite steps in a row.

    Usage::

        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        if guard.check(loss, grad_norm, step=state.step):
            optimizer.step()
        optimizer.zero_grad()
    """

    def __init__(self, accelerator: Accelerator, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.accelerator = accelerator
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None = None, step: int | None = None
    ) -> bool:
        """True when the step is finite on every rank; False (and counted) when it must be skipped.

        Raises:
            NonFiniteLossError: after ``max_consecutive`` skipped steps in a row.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if grad_norm is not None:
            norm = float(grad_norm)
            bad = bad or not math.isfinite(norm)
        flag = torch.tensor([1.0 if bad else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="max")  # one rank's NaN skips the step everywhere
        if flag.item() == 0:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        where = f" at step {step}" if step is not None else ""
        logger.warning(
            f"non-finite loss or gradient{where}: optimizer step skipped "
            f"({self.consecutive} in a row, {self.total_skipped} in total)",
            main_process_only=True,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive non-finite steps{where} (limit {self.max_consecutive}); "
                "training stopped without saving. Resume from the last complete checkpoint with a lower learning "
                "rate or check the data."
            )
        return False
