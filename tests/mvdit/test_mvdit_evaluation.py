"""The caption-following analyser (genvis.pipelines.mvdit_evaluation) on the procedural generator's own clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genvis.data.builtin import (
    ATTRIBUTE_OPTIONS,
    VideoAttributes,
    attribute_combinations,
    procedural_video,
)
from genvis.pipelines.mvdit_evaluation import (
    caption_following_report,
    clip_to_uint8,
    parse_caption,
    read_clip_attributes,
)


def _clips(count: int, size: int = 32, seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    combos, _ = attribute_combinations()
    rng = np.random.default_rng(seed)
    captions, clips = [], []
    for index in rng.permutation(len(combos))[:count]:
        video = procedural_video(rng, 9, size, num_shapes=(1, 1), camera_pan_probability=0.0, attributes=combos[index])
        captions.append(video.caption)
        clips.append(video.frames)
    return captions, clips


def _gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """(T, H, W, 3) uint8 -> blurred uint8 (a model's output is blurry)."""
    radius = int(np.ceil(3 * sigma))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_reads_the_generators_own_clips_exactly():
    captions, clips = _clips(60)
    report = caption_following_report(captions, clips)
    assert report["accuracy"] == {"background": 1.0, "color": 1.0, "kind": 1.0, "motion": 1.0, "all": 1.0}
    assert report["n"] == 60 and len(report["per_clip"]) == 60


def test_input_layouts_agree():
    captions, clips = _clips(1)
    frames = clips[0]
    as_float = torch.from_numpy(frames).float() / 127.5 - 1.0  # (T, H, W, 3) in [-1, 1]
    expected = read_clip_attributes(frames)
    assert expected == parse_caption(captions[0])
    assert read_clip_attributes(as_float) == expected
    assert read_clip_attributes(as_float.permute(0, 3, 1, 2)) == expected  # (T, 3, H, W)
    np.testing.assert_array_equal(clip_to_uint8(as_float.permute(0, 3, 1, 2).numpy()), frames)
    with pytest.raises(ValueError, match="clip"):
        clip_to_uint8(np.zeros((9, 32, 32)))


def test_robust_to_blur_noise_and_mp4(tmp_path):
    from genvis.data.video import read_frames, write_mp4

    captions, clips = _clips(40, seed=1)
    rng = np.random.default_rng(0)
    degraded = []
    for index, frames in enumerate(clips):
        path = tmp_path / f"{index}.mp4"
        write_mp4(path, frames, fps=8.0)
        decoded = read_frames(path, list(range(len(frames))))
        noisy = _gaussian_blur(decoded, 1.0).astype(np.float32) + rng.normal(0, 8, decoded.shape)
        degraded.append(noisy.clip(0, 255).astype(np.uint8))
    accuracy = caption_following_report(captions, degraded)["accuracy"]
    assert accuracy["background"] >= 0.95 and accuracy["color"] >= 0.95 and accuracy["motion"] >= 0.95, accuracy
    assert accuracy["kind"] >= 0.8 and accuracy["all"] >= 0.75, accuracy


def test_noise_and_shuffled_captions_score_near_chance():
    captions, clips = _clips(120, seed=2)
    report = caption_following_report(captions, clips)
    shuffled, chance = report["shuffled"], report["chance"]
    rng = np.random.default_rng(0)
    noise = [rng.uniform(-1, 1, (9, 32, 32, 3)).astype(np.float32) for _ in captions]
    on_noise = caption_following_report(captions, noise)["accuracy"]
    for name in ("background", "color", "kind", "motion"):
        assert abs(shuffled[name] - chance[name]) < 0.15, (name, shuffled, chance)
        assert abs(on_noise[name] - chance[name]) < 0.15, (name, on_noise, chance)
    assert shuffled["all"] < 0.05 and on_noise["all"] < 0.05
    assert chance["all"] == pytest.approx(1 / (5 * 6 * 3 * 4))


def test_parse_caption_and_report_errors():
    assert parse_caption("an orange circle moves bottom to top over a teal background, the camera pans left") == (
        VideoAttributes("teal", "orange", "circle", "bottom to top")
    )
    two = "a red square moves left to right and a white triangle moves top to bottom over a black background"
    assert parse_caption(two) == VideoAttributes("black", "red", "square", "left to right")
    assert parse_caption("a rabbit in a meadow") == VideoAttributes(None, None, None, None)
    clip = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not state"):
        caption_following_report(["a rabbit in a meadow"], [clip])
    with pytest.raises(ValueError, match="one per caption"):
        caption_following_report([two], [clip, clip])
    with pytest.raises(ValueError, match="at least one"):
        caption_following_report([], [])
    options = {"background": ["black", "blue"]}
    assert caption_following_report([two], [clip], options=options)["chance"]["background"] == 0.5


def test_attribute_combinations_hold_out_unseen_combinations_of_seen_words():
    train, held_out = attribute_combinations(["blue", "gray"], ["red", "green"], None, None, num_held_out=4, seed=3)
    assert len(train) + len(held_out) == 2 * 2 * 3 * 4 and len(held_out) == 4
    assert not set(train) & set(held_out)
    for combo in held_out:
        for i in range(4):
            for j in range(i + 1, 4):
                assert any(t[i] == combo[i] and t[j] == combo[j] for t in train)
    assert attribute_combinations(["blue", "gray"], ["red", "green"], num_held_out=4, seed=3) == (train, held_out)
    with pytest.raises(ValueError, match="colors"):
        attribute_combinations(colors=["blue"])  # a background colour is not a shape colour
    with pytest.raises(ValueError, match="kinds"):
        attribute_combinations(kinds=[])
    with pytest.raises(ValueError, match="num_held_out"):
        attribute_combinations(["blue"], ["red"], ["circle"], ["left to right"], num_held_out=1)
    assert set(ATTRIBUTE_OPTIONS) == set(VideoAttributes._fields)


def test_procedural_video_with_fixed_attributes():
    attributes = VideoAttributes("gray", "yellow", "triangle", "top to bottom")
    video = procedural_video(5, 9, 32, num_shapes=(1, 1), camera_pan_probability=0.0, attributes=attributes)
    assert video.caption == attributes.caption() == "a yellow triangle moves top to bottom over a gray background"
    assert video.background == "gray" and video.motions == ["top to bottom"] and len(video.shapes) == 1
    with pytest.raises(ValueError, match="num_shapes"):
        procedural_video(5, 9, 32, attributes=attributes)
    with pytest.raises(ValueError, match=r"attributes\.color"):
        procedural_video(5, 9, 32, num_shapes=(1, 1), attributes=attributes._replace(color="blue"))


def test_labelled_clip_grid():
    from genvis.pipelines.mvdit_evaluation import labelled_clip_grid

    captions, clips = _clips(2, size=16)
    grid = labelled_clip_grid(clips, captions)
    assert grid.height == 2 * (14 + 96 + 4) + 4  # 16 px frames upscaled 6x, one label line each
    assert grid.width >= 5 * 96
    with pytest.raises(ValueError, match="labels"):
        labelled_clip_grid(clips, captions[:1])
