"""Exponential moving average of model weights, via diffusers ``EMAModel`` (checkpointable with accelerate)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

__all__ = ["EMAConfig", "create_ema", "ema_weights"]


@dataclass
class EMAConfig:
    """The ``ema:`` section of a training preset: sample and export with averaged weights.

    Args:
        enabled: keep an EMA of the trainable weights.
        decay: maximum decay; diffusers' warm-up ``1 - (1 + step)^(-2/3)`` ramps up to it, so a short run's EMA is
            not stuck at the initial weights (0.999 is reached after ~30k steps, 0.99 after ~1k).
    """

    enabled: bool = True
    decay: float = 0.999

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay: expected a value in [0, 1), got {self.decay}")


def create_ema(
    model: nn.Module, accelerator: Accelerator | None = None, decay: float = 0.9999, warmup: bool = True
) -> EMAModel:
    """Build an EMA of ``model`` (on its device) and register it so ``save_state`` / ``load_state`` include it.

    Args:
        model: the (unwrapped) model to average.
        accelerator: when given, the EMA is registered for checkpointing.
        decay: maximum decay.
        warmup: use diffusers' ``1 - (1 + step) / (10 + step)`` warm-up, so early EMA weights are not stuck at init.
    """
    config = getattr(model, "config", None)
    ema = EMAModel(
        model.parameters(),
        decay=decay,
        use_ema_warmup=warmup,
        inv_gamma=1.0,
        power=2 / 3,
        model_cls=type(model) if config is not None else None,
        model_config=config,
    )
    ema.to(next(model.parameters()).device)
    if accelerator is not None:
        accelerator.register_for_checkpointing(ema)
    return ema


@contextmanager
def ema_weights(ema: EMAModel | None, model: nn.Module):
    """Temporarily load the EMA weights into ``model`` (no-op when ``ema`` is None); the live weights come back after."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())
