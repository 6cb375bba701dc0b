"""Exponential moving average of model weights, via diffusers ``EMAModel`` (checkpointable with accelerate)."""

from __future__ import annotations

from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

__all__ = ["create_ema"]


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
