"""Offline data tools: the ``genvis-shards`` builder (OpenVid CSV + videos -> webdataset shards) and built-in data.

Public names are imported lazily, so a spawned probe worker (which imports ``data_pipelines.probe``) does not pay for
torch and webdataset imports it never uses.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BuildConfig": "data_pipelines.build",
    "BuildReport": "data_pipelines.build",
    "Rejection": "data_pipelines.build",
    "build_shards": "data_pipelines.build",
    "read_manifest": "data_pipelines.build",
    "builtin_dataset_root": "data_pipelines.datasets",
    "ensure_builtin_shards": "data_pipelines.datasets",
    "write_builtin_source": "data_pipelines.datasets",
    "verify_shards": "data_pipelines.verify",
    "ClipConfig": "genvis.data.loaders",
    "make_video_dataset": "genvis.data.loaders",
    "make_video_loader": "genvis.data.loaders",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
