"""What every training script shares: accelerate set-up, atomic checkpoints + resume, EMA, non-finite guard,
strict configs, progress and sample logging. Scripts under ``train/`` keep their loop visible and call these."""

from genvis.training.checkpointing import (
    CheckpointError,
    CheckpointManager,
    TrainState,
    find_latest_checkpoint,
    verify_checkpoint,
)
from genvis.training.config import (
    CheckpointConfig,
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    load_config,
)
from genvis.training.ema import EMAConfig, create_ema, ema_weights
from genvis.training.guard import NonFiniteGuard, NonFiniteLossError
from genvis.training.logging import log_image, log_image_grid, make_grid, to_pil
from genvis.training.setup import flatten_for_tracker, progress_bar, setup_accelerator

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "EMAConfig",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "TrainState",
    "add_config_arguments",
    "config_from_args",
    "config_to_dict",
    "create_ema",
    "ema_weights",
    "find_latest_checkpoint",
    "flatten_for_tracker",
    "load_config",
    "log_image",
    "log_image_grid",
    "make_grid",
    "progress_bar",
    "setup_accelerator",
    "to_pil",
    "verify_checkpoint",
]
