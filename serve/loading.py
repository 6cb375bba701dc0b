"""Checkpoint discovery and loading for the demo.

A ``--checkpoint`` path may be any of:

1. an exported folder: a pipeline ``save_pretrained`` folder with ``model_index.json`` (LaVin-DiT, MVDiT) or a
   ``VisionLanguageModel.save_pretrained`` folder with ``vision_language_config.json`` (MLLM);
2. one accelerate checkpoint ``.../checkpoints/checkpoint-XXXXXXXX/``: it must be complete (``COMPLETE.json`` verifies,
   :func:`genvis.training.verify_checkpoint`) and hold the pipeline its training script exported into it
   (``<checkpoint>/<name>/model_index.json``; an ``ema`` export is preferred, since EMA weights sample better);
3. a run folder ``runs/<family>/``: the newest *complete* checkpoint under ``checkpoints/`` that holds an export
   (:func:`genvis.training.find_latest_checkpoint` skips broken ones), else a pipeline exported into the run folder.

Anything else gives a :class:`CheckpointLoadError` whose message says what was found, what was expected and how to
make a checkpoint (``accelerate launch train/<family>.py ...``). The app shows that message on the tab and logs it
instead of a stack trace. Tested in tests/serve/test_handlers.py.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "CheckpointLoadError",
    "FamilyInfo",
    "ModelSlot",
    "load_encoder",
    "load_family",
    "load_slot",
    "resolve_pipeline_dir",
    "training_config",
]

logger = logging.getLogger("genvis.serve")

MODEL_INDEX = "model_index.json"
MARKER = "COMPLETE.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointLoadError(RuntimeError):
    """A checkpoint path that cannot be served; the message is shown as is in the UI."""


@dataclass(frozen=True)
class FamilyInfo:
    """What the demo needs to know about one model family.

    Args:
        key: short name (``lavin_dit``), also the ``runs/<key>`` folder and ``train/<key>.py`` script.
        title: display name.
        module: module holding the pipeline class.
        class_name: the pipeline / model class (a ``model_index.json``'s ``_class_name`` must name it, as a string
            or as diffusers' ``[module file, class]``).
        train_command: the command that makes a checkpoint.
        index_file: the file that marks an exported folder of this family.
        export_name: the export's folder name inside a checkpoint or run folder (in messages).
    """

    key: str
    title: str
    module: str
    class_name: str
    train_command: str
    index_file: str = "model_index.json"
    export_name: str = "pipeline"

    def how_to_make(self) -> str:
        return (
            f"Make one with `{self.train_command}` (it writes `runs/{self.key}/checkpoints/checkpoint-*/` with an "
            f"exported `{self.export_name}/`), then start the demo with `--{self.flag} runs/{self.key}`."
        )

    @property
    def flag(self) -> str:
        return "checkpoint" if self.key == "lavin_dit" else f"{self.key.replace('_', '-')}-checkpoint"


FAMILIES: dict[str, FamilyInfo] = {
    "lavin_dit": FamilyInfo(
        "lavin_dit",
        "LaVin-DiT",
        "genvis.pipelines.pipeline_lavin_dit",
        "LaVinDiTPipeline",
        "accelerate launch train/lavin_dit.py --config train/configs/lavin_dit/tiny.yaml",
    ),
    "mllm": FamilyInfo(
        "mllm",
        "MLLM",
        "genvis.models.vision_tower",
        "VisionLanguageModel",
        "accelerate launch train/mllm.py --config train/configs/mllm/tiny.yaml",
        index_file="vision_language_config.json",
        export_name="model",
    ),
    "mvdit": FamilyInfo(
        "mvdit",
        "MVDiT",
        "genvis.pipelines.pipeline_mvdit",
        "MVDiTPipeline",
        "accelerate launch train/mvdit.py --config train/configs/mvdit/tiny.yaml",
    ),
}


def _family(family: str | FamilyInfo) -> FamilyInfo:
    if isinstance(family, FamilyInfo):
        return family
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


def _exports_in(folder: Path, info: FamilyInfo) -> list[Path]:
    """Exported folders one or two levels below ``folder``, EMA exports first."""
    patterns = ("*/" + info.index_file, "*/*/" + info.index_file)
    found = [index.parent for pattern in patterns for index in folder.glob(pattern)]
    return sorted(found, key=lambda path: ("ema" not in path.relative_to(folder).as_posix().lower(), str(path)))


def _checkpoint_export(checkpoint: Path, info: FamilyInfo) -> Path:
    from genvis.training import CheckpointError, verify_checkpoint

    try:
        verify_checkpoint(checkpoint)
    except CheckpointError as err:
        raise CheckpointLoadError(f"{info.title}: checkpoint {checkpoint} is incomplete or corrupt: {err}") from None
    exports = _exports_in(checkpoint, info)
    if not exports:
        raise CheckpointLoadError(
            f"{info.title}: checkpoint {checkpoint} is complete but holds no export (no */{info.index_file}); "
            f"it was not written by `train/{info.key}.py`. {info.how_to_make()}"
        )
    return exports[0]


def _newest_exported_checkpoint(checkpoints: Path, info: FamilyInfo) -> Path | None:
    """Export of the newest checkpoint that verifies and holds one; broken ones are logged and skipped."""
    steps = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, checkpoint in sorted(steps, reverse=True):
        if not _exports_in(checkpoint, info):
            continue  # e.g. a save whose export hook was off; nothing to serve there
        try:
            return _checkpoint_export(checkpoint, info)
        except CheckpointLoadError as err:
            logger.warning(f"skipping checkpoint: {err}")
    return None


def resolve_pipeline_dir(path: str | os.PathLike, family: str | FamilyInfo) -> Path:
    """Find the ``save_pretrained`` pipeline folder behind a pipeline, checkpoint or run folder (module docstring)."""
    info = _family(family)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointLoadError(f"{info.title}: {folder} does not exist. {info.how_to_make()}")
    if not folder.is_dir():
        raise CheckpointLoadError(
            f"{info.title}: {folder} is a file; expected a run folder, a checkpoint-XXXXXXXX folder or an exported "
            f"folder (with {info.index_file})"
        )
    if (folder / info.index_file).is_file():
        return folder
    if (folder / MARKER).exists() or folder.name.startswith("checkpoint-"):
        return _checkpoint_export(folder, info)
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir():
        found = _newest_exported_checkpoint(checkpoints, info)
        if found is not None:
            return found
    exports = [path for path in _exports_in(folder, info) if "checkpoint-" not in path.as_posix()]
    if exports:
        return exports[0]
    if checkpoints.is_dir():
        raise CheckpointLoadError(
            f"{info.title}: {checkpoints} holds no complete checkpoint with an export "
            f"(a run killed before its first save, or every checkpoint failed verification). {info.how_to_make()}"
        )
    raise CheckpointLoadError(
        f"{info.title}: {folder} is not a run folder (no checkpoints/), a checkpoint or an exported pipeline "
        f"(no {info.index_file}). {info.how_to_make()}"
    )


def _index_class_name(entry: Any) -> str | None:
    """The pipeline class a ``model_index.json`` ``_class_name`` names: a bare ``"LaVinDiTPipeline"`` (genvis exports
    before the switch, diffusers' own pipelines) or diffusers' custom-pipeline ``["pipeline_lavin_dit",
    "LaVinDiTPipeline"]`` (loader module file, class; what genvis writes now); None for anything else."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(part, str) for part in entry):
        return entry[1]
    return None


def load_family(
    path: str | os.PathLike, family: str | FamilyInfo, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, Path]:
    """Resolve and load a family's pipeline -> ``(pipeline, folder loaded)``.

    Raises:
        CheckpointLoadError: nothing loadable at ``path``, a pipeline of another family, or weights that do not fit
            the class (the loader's error is quoted).
    """
    info = _family(family)
    folder = resolve_pipeline_dir(path, info)
    try:
        index = json.loads((folder / info.index_file).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointLoadError(f"{info.title}: {folder / info.index_file} is unreadable ({err})") from None
    found = _index_class_name(index.get("_class_name") if isinstance(index, dict) else None)
    if info.index_file == MODEL_INDEX and found != info.class_name:
        raise CheckpointLoadError(
            f"{info.title}: {folder} holds a {found or 'pipeline of unknown class'}, expected a {info.class_name}; "
            f"pass it to the matching tab's flag instead"
        )
    try:
        pipeline_class = getattr(importlib.import_module(info.module), info.class_name)
    except (ImportError, AttributeError) as err:
        raise CheckpointLoadError(
            f"{info.title}: this genvis installation has no {info.module}.{info.class_name} ({err})"
        ) from None
    try:
        if info.index_file == MODEL_INDEX:
            pipeline = pipeline_class.from_pretrained(folder, dtype=dtype)
        else:
            pipeline = pipeline_class.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointLoadError(
            f"{info.title}: {folder} could not be loaded as a {info.class_name} (incompatible or damaged: "
            f"{type(err).__name__}: {message[:300]})"
        ) from None
    pipeline = pipeline.to(device)
    if isinstance(pipeline, torch.nn.Module):
        pipeline.eval()
    return pipeline, folder


RUN_CONFIG = "config.json"  # the resolved training config a run folder holds (genvis.training.setup_accelerator)


def training_config(folder: Path) -> dict | None:
    """The resolved training config behind an exported ``folder``, if any.

    A checkpoint's export (``checkpoint-XXXXXXXX/pipeline``) reads it from the checkpoint's ``COMPLETE.json`` marker;
    a run's final export (``runs/<family>/pipeline``) from the run's ``config.json``. A ``config.json`` without an
    ``output_dir`` and a ``data`` section is someone else's file and ignored.
    """
    marker = folder.parent / MARKER
    run_config = folder.parent / RUN_CONFIG
    try:
        if marker.is_file():
            config = json.loads(marker.read_text()).get("config")
        elif run_config.is_file():
            config = json.loads(run_config.read_text())
            if not (isinstance(config, dict) and "output_dir" in config and isinstance(config.get("data"), dict)):
                config = None
        else:
            config = None
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


@dataclass
class ModelSlot:
    """A family's pipeline as the app holds it: loaded, or the reason it is not.

    Args:
        family: the family.
        pipeline: the loaded pipeline, or None.
        folder: the folder it was loaded from.
        message: what the tab shows (where the model came from, or why there is none and how to make one).
        train_config: the training run's resolved config when the folder came from a checkpoint (e.g. its resolution).
    """

    family: FamilyInfo
    pipeline: Any = None
    folder: Path | None = None
    message: str = ""
    train_config: dict | None = None

    def config_value(self, *keys: str) -> Any:
        """``train_config[k1][k2]...`` or None."""
        value: Any = self.train_config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    def require(self) -> Any:
        """The pipeline; raises :class:`CheckpointLoadError` carrying :attr:`message` when there is none."""
        if self.pipeline is None:
            raise CheckpointLoadError(self.message)
        return self.pipeline


def load_slot(path: str | os.PathLike | None, family: str | FamilyInfo, device: str = "cpu") -> ModelSlot:
    """Load ``path`` into a :class:`ModelSlot`; failures become the slot's message (and a log line), never raise."""
    info = _family(family)
    if path is None:
        message = f"No {info.title} checkpoint given. {info.how_to_make()}"
        logger.info(message)
        return ModelSlot(info, message=message)
    try:
        pipeline, folder = load_family(path, info, device=device)
    except CheckpointLoadError as err:
        logger.error(str(err))
        return ModelSlot(info, message=str(err))
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(desc=f"{info.title} sampling")
    logger.info(f"{info.title}: loaded {folder}")
    return ModelSlot(
        info,
        pipeline=pipeline,
        folder=folder,
        message=f"{info.title}: loaded `{folder}`",
        train_config=training_config(folder),
    )


def load_encoder(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, str]:
    """A ``genvis.encoders.VisionTransformerModel`` ``save_pretrained`` folder -> ``(encoder, label)``.

    Raises:
        CheckpointLoadError: the folder is missing or is not a VisionTransformerModel export.
    """
    from genvis.encoders import VisionTransformerModel

    folder = Path(path).expanduser()
    config_path = folder / "config.json"
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise CheckpointLoadError(
            f"encoder: {folder} is not a VisionTransformerModel save_pretrained folder ({config_path}: {err})"
        ) from None
    if class_name != "VisionTransformerModel":
        raise CheckpointLoadError(f"encoder: {folder} holds a {class_name}, expected a VisionTransformerModel")
    try:
        encoder = VisionTransformerModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointLoadError(f"encoder: {folder} could not be loaded ({type(err).__name__}: {err})") from None
    registers = encoder.config.num_register_tokens
    return encoder.to(device).eval(), f"{folder.name} ({registers} registers)"
