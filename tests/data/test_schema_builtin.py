"""Shard schema (OpenVid header, aliases, keys) and the built-in data (real images/videos, procedural labels)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from genvis.data.builtin import (
    SHAPE_COLORS,
    builtin_images,
    builtin_videos,
    center_crop_resize,
    procedural_scene,
    procedural_video,
    write_procedural_dataset,
)
from genvis.data.schema import CSV_COLUMNS, OPENVID_HEADER, resolve_columns, sample_key
from genvis.data.video import video_info


def test_openvid_header_and_aliases() -> None:
    assert OPENVID_HEADER == (
        "video",
        "caption",
        "aesthetic score",
        "motion score",
        "temporal consistency score",
        "camera motion",
        "frame",
        "fps",
        "seconds",
    )
    positions = resolve_columns(["Video", "caption", "Motion_Score", "num_frames", "duration"], CSV_COLUMNS)
    assert positions == {"video": 0, "caption": 1, "motion_score": 2, "frame": 3, "seconds": 4}
    assert sample_key("dir/abc_0.5to3.2.mp4") == "abc_0_5to3_2"
    # Letters of any script stay (NFC), so non-ASCII names do not collapse to one key.
    assert sample_key("célèbre clip.mp4") == "célèbre_clip"
    assert sample_key("ce\u0301le\u0300bre clip.mp4") == "célèbre_clip"  # macOS NFD file name
    assert sample_key("東京の夜.mp4") == "東京の夜"
    assert sample_key("🎬🎬.mp4") != sample_key("🎥.mp4")
    assert sample_key("🎬🎬.mp4").startswith("sample_")
    long_key = sample_key("é" * 200 + ".mp4")
    assert len(long_key.encode()) <= 80 and long_key != sample_key("é" * 201 + ".mp4")  # fits a USTAR tar name


def test_builtin_images_and_videos_are_real_and_offline() -> None:
    images = dict(builtin_images())
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera", "china", "flower"} <= set(images)
    assert images["astronaut"].shape == (512, 512, 3) and images["camera"].shape == (512, 512, 3)
    for name, image in images.items():
        assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8, name
        assert image.std() > 5, name  # real content, not a blank fallback
    square = center_crop_resize(images["chelsea"], 32)
    assert square.shape == (32, 32, 3) and square.std() > 5
    videos = builtin_videos()
    assert [path.name for path in videos] == ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]
    assert video_info(videos[2]).width == 176


def test_procedural_scene_labels_are_exact() -> None:
    scene = procedural_scene(7, size=48, num_shapes=(3, 3))
    assert len(scene.shapes) == 3 and scene.image.shape == (48, 48, 3)
    assert np.array_equal(scene.foreground_mask, scene.layer_ids > 0)
    assert np.array_equal(scene.depth_order, scene.layer_ids)
    for shape in scene.shapes:
        visible = scene.layer_ids == shape.layer
        if visible.any():  # fully occluded shapes are possible; visible pixels have exactly the shape's colour
            assert np.all(scene.image[visible] == SHAPE_COLORS[shape.color])
    assert np.array_equal(procedural_scene(7, size=48, num_shapes=(3, 3)).image, scene.image)


def test_procedural_video_caption_matches_motion() -> None:
    for seed in range(6):
        video = procedural_video(seed, num_frames=9, size=64)
        assert video.frames.shape == (9, 64, 64, 3) and video.masks.shape == (9, 64, 64)
        for shape, motion in zip(video.shapes, video.motions, strict=True):
            assert f"{shape.color} {shape.kind} moves {motion}" in video.caption
            # Centroid of the shape's own layer (first vs last frame) moves the way the caption says.
            first, last = (np.argwhere(video.layer_ids[t] == shape.layer).mean(axis=0) for t in (0, -1))
            dy, dx = last - first
            expected = {"left to right": dx > 5, "right to left": dx < -5, "top to bottom": dy > 5}
            assert expected.get(motion, dy < -5), (seed, motion, dx, dy)
        assert video.background in video.caption


def test_write_procedural_dataset_is_openvid_shaped(tmp_path: Path) -> None:
    csv_path = write_procedural_dataset(tmp_path, num_videos=3, num_frames=9, size=32, seed=1)
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == OPENVID_HEADER
        rows = list(reader)
    assert len(rows) == 3
    for row in rows:
        info = video_info(tmp_path / "videos" / row["video"])
        assert (info.num_frames, info.fps) == (int(row["frame"]), float(row["fps"]))
        assert float(row["seconds"]) == info.num_frames / info.fps
        assert float(row["motion score"]) > 0 and 0 < float(row["temporal consistency score"]) <= 1
    again = write_procedural_dataset(tmp_path / "again", num_videos=3, num_frames=9, size=32, seed=1)
    assert again.read_text() == csv_path.read_text()
