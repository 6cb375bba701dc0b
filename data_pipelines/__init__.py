"""Offline data tools: the ``genvis-shards`` builder (OpenVid CSV + videos -> webdataset shards) and built-in data."""

from data_pipelines.build import BuildConfig, BuildReport, Rejection, build_shards, read_manifest
from data_pipelines.datasets import builtin_dataset_root, ensure_builtin_shards, write_builtin_source
from genvis.data.loaders import ClipConfig, make_video_dataset, make_video_loader

__all__ = [
    "BuildConfig",
    "BuildReport",
    "ClipConfig",
    "Rejection",
    "build_shards",
    "builtin_dataset_root",
    "ensure_builtin_shards",
    "make_video_dataset",
    "make_video_loader",
    "read_manifest",
    "write_builtin_source",
]
