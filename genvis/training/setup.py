"""Accelerator set-up shared by every ``train/<family>.py`` script: project dirs, trackers, per-rank seeds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

__all__ = ["flatten_for_tracker", "progress_bar", "setup_accelerator"]

logger = get_logger(__name__)


def flatten_for_tracker(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Flatten a nested config into ``a.b`` keys with scalar values (what TensorBoard hparams accept)."""
    flat: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_for_tracker(value, name + "."))
        elif isinstance(value, int | float | str | bool):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def setup_accelerator(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    log_with: str | list[str] | None = "tensorboard",
    project_name: str = "genvis",
    config: dict | None = None,
    cpu: bool | None = None,
) -> Accelerator:
    """Create the accelerator for a training run.

    - ``cpu`` defaults to "no CUDA device"; on CPU, two processes need
      ``accelerate launch --multi_gpu --num_processes 2`` (``--cpu`` silently runs one process).
    - Seeds ``seed + process_index`` on every rank so noise/timestep draws differ between ranks.
    - Initialises trackers (TensorBoard by default) under ``<output_dir>/logs`` and writes the resolved ``config``
      to ``<output_dir>/config.json``.

    Raises:
        RuntimeError: when the launcher started more processes than the accelerator sees (each would train alone).
    """
    output_dir = Path(output_dir)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"launcher started WORLD_SIZE={world} processes but the accelerator sees {accelerator.num_processes}; "
            "on CPU use `accelerate launch --multi_gpu --num_processes N` with Accelerator(cpu=True)"
        )
    set_seed(seed, device_specific=True)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (output_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if log_with:
        accelerator.init_trackers(project_name, config=flatten_for_tracker(config or {}))
    logger.info(
        f"{accelerator.num_processes} process(es), device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}",
        main_process_only=True,
    )
    return accelerator


def progress_bar(accelerator: Accelerator, total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A tqdm bar shown on the local main process only, starting at ``initial`` when resuming."""
    return tqdm(
        total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True
    )
