"""Atomic accelerate checkpoints with resume-from-latest-complete.

``accelerator.save_state`` writes files in place, and with ``total_limit`` it prunes *before* writing, so a kill during
a save can leave no usable checkpoint (specs/perf_reliability_ecosystem.md §B1). :class:`CheckpointManager` instead:

1. saves into ``checkpoint-<step>.tmp/`` (all ranks, through ``save_state``, so every registered object, RNG state and
   save hook is included),
2. refuses to save non-finite weights,
3. writes ``COMPLETE.json`` (step, file sizes, sha256) inside the temp folder, fsyncs, and renames it to
   ``checkpoint-<step>/`` in one atomic ``os.replace``,
4. prunes old checkpoints only after that.

:meth:`CheckpointManager.resume` loads the newest folder whose marker verifies; incomplete or corrupt ones are
reported (file, expected vs actual hash) and skipped. Tested in tests/training/test_checkpointing.py, including a
SIGKILL in the middle of a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

__all__ = ["CheckpointError", "CheckpointManager", "TrainState", "find_latest_checkpoint", "verify_checkpoint"]

logger = get_logger(__name__)

MARKER = "COMPLETE.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or would hold non-finite weights."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``).

    Args:
        step: optimizer steps taken (including skipped non-finite ones).
        epoch: data epoch, folded into data seeds so a resumed run sees the same order.
        samples_seen: global samples consumed, for map-style resumption.
        skipped_steps: optimizer steps skipped by the non-finite guard.
    """

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise CheckpointError(f"unknown TrainState field {key!r} in checkpoint")
            setattr(self, key, int(value))


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(folder: Path, step: int, extra: dict | None) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    marker = {"step": step, "time": time.time(), "files": files, **(extra or {})}
    tmp_marker = folder / (MARKER + ".tmp")
    tmp_marker.write_text(json.dumps(marker, indent=1))
    with open(tmp_marker, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_marker, folder / MARKER)
    _fsync_dir(folder)


def verify_checkpoint(folder: str | os.PathLike, check_hashes: bool = True) -> dict:
    """Return the marker of a complete checkpoint; raise :class:`CheckpointError` naming what is wrong."""
    folder = Path(folder)
    marker_path = folder / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{folder}: no {MARKER} marker (the save did not finish)")
    try:
        marker = json.loads(marker_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{marker_path}: unreadable marker ({err})") from err
    for name, meta in marker["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MARKER} but missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{path}: expected {meta['bytes']} bytes, got {size}")
        if check_hashes:
            actual = _sha256(path)
            if actual != meta["sha256"]:
                raise CheckpointError(f"{path}: sha256 mismatch, expected {meta['sha256']}, got {actual}")
    return marker


def _step_folders(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def find_latest_checkpoint(checkpoint_dir: str | os.PathLike, check_hashes: bool = True) -> Path | None:
    """Newest checkpoint folder under ``checkpoint_dir`` that verifies; broken ones are logged and skipped."""
    for _, folder in reversed(_step_folders(Path(checkpoint_dir))):
        try:
            verify_checkpoint(folder, check_hashes=check_hashes)
        except CheckpointError as err:
            logger.warning(f"skipping incomplete checkpoint: {err}", main_process_only=True)
            continue
        return folder
    return None


def _assert_finite(models: Iterable[torch.nn.Module]) -> None:
    for index, model in enumerate(models):
        for name, tensor in model.state_dict().items():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(
                    f"refusing to save: model {index} has non-finite values in {name!r}; "
                    "the previous checkpoint is kept"
                )


class CheckpointManager:
    """Atomic save / verified resume around ``accelerator.save_state`` / ``load_state``.

    Args:
        accelerator: the run's accelerator; models, optimizers and schedulers must already be prepared.
        checkpoint_dir: folder holding ``checkpoint-<step>/`` folders.
        total_limit: complete checkpoints kept (oldest pruned after a successful save); None keeps all.
        check_hashes: verify sha256 of every file on resume (size only when False, for very large checkpoints).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        checkpoint_dir: str | os.PathLike,
        total_limit: int | None = 3,
        check_hashes: bool = True,
    ) -> None:
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"total_limit must be >= 1 or None, got {total_limit}")
        self.accelerator = accelerator
        self.checkpoint_dir = Path(checkpoint_dir)
        self.total_limit, self.check_hashes = total_limit, check_hashes
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.state)

    def latest(self) -> Path | None:
        return find_latest_checkpoint(self.checkpoint_dir, check_hashes=self.check_hashes)

    def save(self, extra_marker: dict | None = None, export_fn: Callable[[Path], None] | None = None) -> Path:
        """Save the full training state at ``self.state.step``; returns the final folder.

        Args:
            extra_marker: JSON-able metadata stored in the marker (e.g. the resolved config).
            export_fn: called on the main process with the temp folder before it is sealed, e.g. to write
                ``save_pretrained`` folders that serve/ can load.
        """
        acc = self.accelerator
        _assert_finite(acc._models)
        step = self.state.step
        final = self.checkpoint_dir / f"checkpoint-{step:08d}"
        tmp = self.checkpoint_dir / f"checkpoint-{step:08d}.tmp"
        if acc.is_main_process:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over from a killed save
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if export_fn is not None:
                export_fn(tmp)
            _write_marker(tmp, step, extra_marker)
            if final.exists():  # same step saved twice (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.checkpoint_dir)
            self._prune()
            logger.info(f"saved checkpoint {final}", main_process_only=True)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        complete = [p for _, p in _step_folders(self.checkpoint_dir) if (p / MARKER).is_file()]
        for folder in complete[: max(0, len(complete) - self.total_limit)]:
            shutil.rmtree(folder, ignore_errors=True)

    def resume(self, path: str | os.PathLike | None = None) -> Path | None:
        """Load ``path`` (verified) or the newest complete checkpoint; returns the folder loaded, or None."""
        if path is not None:
            folder = Path(path)
            verify_checkpoint(folder, check_hashes=self.check_hashes)
        else:
            folder = self.latest()
            if folder is None:
                return None
        self.accelerator.load_state(str(folder))
        logger.info(f"resumed from {folder} at step {self.state.step}", main_process_only=True)
        return folder
