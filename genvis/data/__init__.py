"""genvis data: the shard schema, video decoding, built-in datasets and webdataset loaders."""

from genvis.data.builtin import (
    ProceduralScene,
    ProceduralShape,
    ProceduralVideo,
    builtin_images,
    builtin_videos,
    procedural_scene,
    procedural_video,
    write_procedural_dataset,
)
from genvis.data.loaders import (
    BadSampleHandler,
    ClipConfig,
    TooManyBadSamplesError,
    make_video_dataset,
    make_video_loader,
    resolve_shards,
)
from genvis.data.video import (
    VideoInfo,
    causal_vae_num_frames,
    encode_mp4,
    read_frames,
    sample_frame_indices,
    video_info,
    write_mp4,
)

__all__ = [
    "BadSampleHandler",
    "ClipConfig",
    "ProceduralScene",
    "ProceduralShape",
    "ProceduralVideo",
    "TooManyBadSamplesError",
    "VideoInfo",
    "builtin_images",
    "builtin_videos",
    "causal_vae_num_frames",
    "encode_mp4",
    "make_video_dataset",
    "make_video_loader",
    "procedural_scene",
    "procedural_video",
    "read_frames",
    "resolve_shards",
    "sample_frame_indices",
    "video_info",
    "write_mp4",
    "write_procedural_dataset",
]
