"""The model card (``README.md``) every genvis pipeline export carries, for the Hub and for people reading a folder.

YAML front matter as the Hub reads it (``library_name: diffusers``, ``pipeline_tag``, ``tags``, ``license``) and a
body with how to load the folder, its components, and, when the caller passes them, the training command and the
measured metrics. :class:`genvis.pipelines.GenvisPipelineMixin` writes it from ``save_pretrained``
(``model_card={"command": ..., "metrics": {...}}``); docs/pipelines.md, "Model card". Tests: tests/test_exports.py.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MODEL_CARD", "model_card_text", "read_model_card", "write_model_card"]

MODEL_CARD = "README.md"
DEFAULT_LICENSE = "apache-2.0"  # genvis' own license (pyproject.toml); pass another for weights under other terms
CARD_OPTIONS = ("command", "metrics", "license", "tags", "description", "base_model", "datasets")


def _metric_cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def model_card_text(
    pipeline: Any,
    command: str | Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    license: str = DEFAULT_LICENSE,
    tags: Sequence[str] = (),
    description: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
) -> str:
    """The card of a genvis pipeline (see the module doc).

    Args:
        pipeline: the pipeline (its class, ``_model_card_pipeline_tag``, ``_model_card_tags`` and components).
        command: the training command, as one string or argv.
        metrics: measured metrics, ``{name: value}`` (numbers, strings or None); shown as a table.
        license: an SPDX-style Hub license id.
        tags: extra Hub tags.
        description: a paragraph about this model.
        base_model: the Hub id or path of the model this one was fine-tuned from.
        datasets: Hub dataset ids.

    Raises:
        ValueError: a metric name that is not a string, or a metrics value that is not a mapping.
    """
    cls = type(pipeline)
    stem = cls.__module__.rsplit(".", 1)[-1]
    front: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": getattr(cls, "_model_card_pipeline_tag", None),
        "license": license,
        "tags": list(dict.fromkeys(["genvis", *getattr(cls, "_model_card_tags", ()), *tags])),
    }
    if base_model:
        front["base_model"] = base_model
    if datasets:
        front["datasets"] = list(datasets)
    front = {key: value for key, value in front.items() if value is not None}
    if metrics is not None and not isinstance(metrics, Mapping):
        raise ValueError(f"model card metrics: expected a mapping name -> value, got {type(metrics).__name__}")
    bad = [name for name in (metrics or {}) if not isinstance(name, str)]
    if bad:
        raise ValueError(f"model card metrics: names must be strings, got {bad}")

    # an old-layout export ("_class_name": "<class>") needs the loader module named (docs/pipelines.md)
    loader = "" if getattr(pipeline, "_class_name_as_list", True) else f'custom_pipeline="{stem}", '
    lines = [f"# {cls.__name__}", ""]
    lines += [description.strip(), ""] if description else []
    lines += [
        f"A genvis `{cls.__name__}` export (diffusers `save_pretrained` layout). Loading it needs the `genvis` package.",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("<this folder or repo id>", {loader}trust_remote_code=True)',
        "```",
        "",
        f"`trust_remote_code=True` lets diffusers run `{stem}.py` from this folder; it only imports genvis. Without",
        f"running folder code: `from {cls.__module__} import {cls.__name__}; {cls.__name__}.from_pretrained(...)`.",
        "",
        "## Components",
        "",
        "| component | class |",
        "| --- | --- |",
    ]
    for name, component in pipeline.components.items():
        if component is not None:
            lines.append(f"| `{name}` | `{type(component).__module__}.{type(component).__name__}` |")
    if command is not None:
        text = command if isinstance(command, str) else " ".join(str(part) for part in command)
        lines += ["", "## Training", "", "```bash", text.strip(), "```"]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {_metric_cell(value)} |" for name, value in metrics.items()]
        lines += ["", "Machine-readable:", "", "```json", json.dumps(dict(metrics), indent=2, default=str), "```"]
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, pipeline: Any, **options: Any) -> Path:
    """Write :func:`model_card_text` to ``<folder>/README.md`` (replacing one there); returns its path.

    Raises:
        ValueError: an option :func:`model_card_text` does not take (the known ones are named).
    """
    unknown = sorted(set(options) - set(CARD_OPTIONS))
    if unknown:
        raise ValueError(f"model_card: unknown options {unknown}; expected some of {list(CARD_OPTIONS)}")
    path = Path(folder) / MODEL_CARD
    path.write_text(model_card_text(pipeline, **options), encoding="utf-8")
    return path


def read_model_card(folder: str | os.PathLike) -> tuple[dict, str]:
    """``(front matter, body)`` of ``<folder>/README.md``.

    Raises:
        ValueError: no card, or no ``---`` YAML front matter at its top.
    """
    path = Path(folder) / MODEL_CARD
    if not path.is_file():
        raise ValueError(f"{path}: no model card")
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{path}: expected YAML front matter between '---' lines at the top")
    header, body = text[4:].split("\n---\n", 1)
    front = yaml.safe_load(header)
    if not isinstance(front, dict):
        raise ValueError(f"{path}: front matter is a {type(front).__name__}, expected a mapping")
    return front, body
