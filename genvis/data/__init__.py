"""genvis data: the shard schema, video decoding, built-in datasets and webdataset loaders.

Names are imported lazily: a probe worker that only needs ``genvis.data.video`` must not pay for torch and
webdataset (imported by the loaders) at start-up, or its first probe runs into the probe timeout.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ProceduralScene": "genvis.data.builtin",
    "ProceduralShape": "genvis.data.builtin",
    "ProceduralVideo": "genvis.data.builtin",
    "builtin_images": "genvis.data.builtin",
    "builtin_videos": "genvis.data.builtin",
    "procedural_scene": "genvis.data.builtin",
    "procedural_video": "genvis.data.builtin",
    "write_procedural_dataset": "genvis.data.builtin",
    "BadSampleHandler": "genvis.data.loaders",
    "ClipConfig": "genvis.data.loaders",
    "TooManyBadSamplesError": "genvis.data.loaders",
    "make_video_dataset": "genvis.data.loaders",
    "make_video_loader": "genvis.data.loaders",
    "resolve_shards": "genvis.data.loaders",
    "FileSlice": "genvis.data.video",
    "VideoInfo": "genvis.data.video",
    "causal_vae_num_frames": "genvis.data.video",
    "encode_mp4": "genvis.data.video",
    "read_frames": "genvis.data.video",
    "sample_frame_indices": "genvis.data.video",
    "video_info": "genvis.data.video",
    "write_mp4": "genvis.data.video",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'genvis.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
