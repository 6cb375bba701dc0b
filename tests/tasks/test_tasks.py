"""In-context tasks: registry, shapes/ranges, determinism, exact targets, held-out split, TaskMixture."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from genvis.data.builtin import procedural_scene, procedural_video
from genvis.tasks import (
    HELD_OUT_IMAGES,
    TASKS,
    SourceDataset,
    TaskMixture,
    TaskSource,
    collate_episodes,
    decode_binary_map,
    decode_depth_order,
    get_task,
    list_tasks,
    sample_episode,
)
from genvis.tasks.ops import canny_edges, down_up, gaussian_blur, grayscale, to_unit_range
from genvis.tasks.registry import BLUR_SIGMA, INPAINT_FILL, NOISE_SIGMA
from genvis.tasks.sources import real_video_frame_range, sample_procedural_video

SIZE = 32


def _seed_of(source_id: str) -> int:
    return int(source_id.split(":")[1])


def test_registry_has_at_least_12_tasks_of_both_kinds():
    assert len(TASKS) >= 12
    assert len(list_tasks("image")) >= 10 and len(list_tasks("video")) >= 4
    assert set(list_tasks()) == set(TASKS)
    for name, task in TASKS.items():
        assert task.name == name
        assert task.kind in ("image", "video")
        assert (task.num_frames == 1) == (task.kind == "image")
        assert task.input_description and task.target_description
        if task.reverse_of is not None:
            assert task.reverse_of in TASKS


def test_get_task_errors_and_num_frames_override():
    with pytest.raises(ValueError, match="colorization"):
        get_task("colourization")
    with pytest.raises(ValueError, match="num_frames"):
        get_task("colorization", num_frames=5)
    with pytest.raises(ValueError, match="num_frames: expected >= 3"):
        get_task("frame_interpolation", num_frames=2)
    assert get_task("frame_prediction", num_frames=9).num_frames == 9
    assert get_task("frame_prediction", num_frames=9).source_num_frames == 18
    with pytest.raises(ValueError, match="kind"):
        list_tasks("audio")


@pytest.mark.parametrize("name", list(TASKS))
def test_episode_shapes_ranges_and_determinism(name):
    task = get_task(name)
    episode = sample_episode(name, num_pairs=2, seed=7, size=SIZE)
    again = sample_episode(name, num_pairs=2, seed=7, size=SIZE)
    other = sample_episode(name, num_pairs=2, seed=8, size=SIZE)
    assert episode.task == name and episode.num_pairs == 2 and len(episode.source_ids) == 3
    clips = episode.clips()
    assert len(clips) == 6
    for clip in clips:
        assert clip.shape == (3, task.num_frames, SIZE, SIZE)
        assert clip.dtype == torch.float32
        assert torch.isfinite(clip).all() and clip.min() >= -1.0 and clip.max() <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(clips, again.clips(), strict=True))
    assert not torch.equal(episode.query, other.query)
    # The input is not already the answer (every task changes something).
    assert any(not torch.equal(a, b) for a, b in episode.context_pairs)


def _pair(name: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, str]:
    episode = sample_episode(name, num_pairs=0, seed=seed, size=SIZE)
    return episode.query, episode.query_target, episode.source_ids[0]


def test_colorization_and_decolorization_are_exact_inverses():
    gray_input, color_target, _ = _pair("colorization")
    assert torch.allclose(grayscale(color_target), gray_input, atol=1e-6)
    assert torch.equal(gray_input[0], gray_input[1]) and torch.equal(gray_input[1], gray_input[2])
    color_input, gray_target, _ = _pair("decolorization")
    assert torch.allclose(grayscale(color_input), gray_target, atol=1e-6)
    # Round trip: the decolorization target is a valid colorization input of the same image.
    assert torch.allclose(grayscale(gray_target), gray_target, atol=1e-6)
    assert not torch.allclose(color_input, gray_target)


def test_degradation_targets_are_exact():
    noisy, clean, _ = _pair("denoising")
    residual = (noisy - clean)[(noisy.abs() < 0.999)]  # unclamped pixels
    assert abs(float(residual.std()) - NOISE_SIGMA) < 0.02
    blurred, sharp, _ = _pair("deblurring")
    assert torch.allclose(gaussian_blur(sharp, BLUR_SIGMA), blurred, atol=1e-6)
    sharp, blurred, _ = _pair("blurring")
    assert torch.allclose(gaussian_blur(sharp, BLUR_SIGMA), blurred, atol=1e-6)
    low, high, _ = _pair("super_resolution_x4")
    assert torch.allclose(down_up(high, 4), low, atol=1e-6)
    low2, high2, _ = _pair("super_resolution_x2")
    assert torch.allclose(down_up(high2, 2), low2, atol=1e-6)
    high, low, _ = _pair("downsampling_x4")
    assert torch.allclose(down_up(high, 4), low, atol=1e-6)
    image, edges, _ = _pair("edge_detection")
    assert set(edges.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(canny_edges(image), edges)


def test_inpainting_changes_only_one_box():
    for seed in range(4):
        holed, full, _ = _pair("inpainting", seed)
        changed = (holed != full).any(dim=0)[0]  # (H, W)
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        top, bottom, left, right = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
        box = holed[:, :, top : bottom + 1, left : right + 1]
        assert torch.all(box == INPAINT_FILL)
        assert 0.2 * SIZE <= bottom - top + 1 <= 0.5 * SIZE + 1
        outside = holed.clone()
        outside[:, :, top : bottom + 1, left : right + 1] = full[:, :, top : bottom + 1, left : right + 1]
        assert torch.equal(outside, full)


def test_segmentation_and_depth_order_match_the_generator():
    for seed in range(3):
        image, mask_map, source_id = _pair("foreground_segmentation", seed)
        scene = procedural_scene(_seed_of(source_id), size=SIZE)
        assert torch.equal(image, to_unit_range(scene.image[None]))
        assert torch.equal(decode_binary_map(mask_map)[0], torch.from_numpy(scene.foreground_mask))
        image, depth_map, source_id = _pair("depth_order", seed)
        scene = procedural_scene(_seed_of(source_id), size=SIZE)
        assert torch.equal(decode_depth_order(depth_map)[0], torch.from_numpy(scene.layer_ids))
        assert int(scene.layer_ids.max()) >= 2  # at least two shapes: the order is informative
    clip, masks, source_id = _pair("video_foreground_segmentation")
    video = procedural_video(_seed_of(source_id), num_frames=clip.shape[1], size=SIZE)
    assert torch.equal(clip, to_unit_range(video.frames))
    assert torch.equal(decode_binary_map(masks), torch.from_numpy(video.masks))


def test_video_tasks_are_exact_rearrangements_of_the_source():
    rng = np.random.default_rng(0)
    source = sample_procedural_video(rng, num_frames=10, size=SIZE, split="train")
    frames = source.pixels  # (3, 10, H, W)
    prediction_input, prediction_target = get_task("frame_prediction").make_pair(source, rng)
    assert torch.equal(prediction_input, frames[:, :5]) and torch.equal(prediction_target, frames[:, 5:])
    past_input, past_target = get_task("past_frame_prediction").make_pair(source, rng)
    assert torch.equal(past_input, frames[:, 5:]) and torch.equal(past_target, frames[:, :5])
    short = TaskSource(frames[:, :5], source.source_id)
    held, full = get_task("frame_interpolation").make_pair(short, rng)
    assert torch.equal(full, frames[:, :5])
    assert torch.equal(held[:, [0, 2, 4]], full[:, [0, 2, 4]]) and torch.equal(held[:, [1, 3]], full[:, [0, 2]])
    forward, backward = get_task("video_reversal").make_pair(short, rng)
    assert torch.equal(backward, forward.flip(1))
    gray, color = get_task("video_colorization").make_pair(short, rng)
    assert torch.allclose(grayscale(color), gray, atol=1e-6)


def test_make_pair_rejects_wrong_sources():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"expected shape \(3, 10, H, W\)"):
        get_task("frame_prediction").make_pair(TaskSource(torch.zeros(3, 5, SIZE, SIZE), "x"), rng)
    with pytest.raises(ValueError, match="needs a labelled source"):
        get_task("depth_order").make_pair(TaskSource(torch.zeros(3, 1, SIZE, SIZE), "image:x"), rng)


def test_held_out_split_is_disjoint():
    train_ids, test_ids = [], []
    for seed in range(12):
        for name in ("colorization", "frame_interpolation"):
            train_ids += sample_episode(name, 2, seed, size=SIZE, split="train").source_ids
            test_ids += sample_episode(name, 2, seed, size=SIZE, split="test").source_ids
    train_images = {sid.split(":")[1] for sid in train_ids if sid.startswith("image:")}
    test_images = {sid.split(":")[1] for sid in test_ids if sid.startswith("image:")}
    assert test_images and train_images and not (train_images & test_images)
    assert test_images <= set(HELD_OUT_IMAGES)
    procedural = ("scene:", "procedural_video:")
    assert all(_seed_of(sid) < 2**31 for sid in train_ids if sid.startswith(procedural))
    assert all(_seed_of(sid) >= 2**31 for sid in test_ids if sid.startswith(procedural))
    real_videos = [(sid, split) for split, ids in (("train", train_ids), ("test", test_ids)) for sid in ids]
    real_videos = [(sid, split) for sid, split in real_videos if sid.startswith("video:")]
    assert {split for _, split in real_videos} == {"train", "test"}
    for sid, split in real_videos:
        _, name, span = sid.split(":")
        first, last = (int(value) for value in span.split("-"))
        start, end = real_video_frame_range({"bigbuckbunny": 132, "bikes": 250, "carphone_pristine": 120}[name], split)
        assert start <= first <= last < end, sid


def test_sample_episode_validates_arguments():
    with pytest.raises(ValueError, match="size"):
        sample_episode("colorization", 1, 0, size=30)
    with pytest.raises(ValueError, match="num_pairs"):
        sample_episode("colorization", -1, 0)
    with pytest.raises(ValueError, match="split"):
        sample_episode("colorization", 1, 0, split="val")


def test_task_mixture_is_deterministic_and_respects_its_arguments():
    mixture = TaskMixture(tasks=["colorization", "depth_order", "video_reversal"], weights=[1, 0, 1],
                          num_pairs=(1, 3), size=SIZE, length=8, seed=5)  # fmt: skip
    episodes = [mixture[index] for index in range(8)]
    assert {episode.task for episode in episodes} <= {"colorization", "video_reversal"}
    assert all(1 <= episode.num_pairs <= 3 for episode in episodes)
    again = mixture[3]
    assert all(torch.equal(a, b) for a, b in zip(again.clips(), episodes[3].clips(), strict=True))
    loader = DataLoader(mixture, batch_size=4, collate_fn=collate_episodes)
    batch = next(iter(loader))
    assert len(batch) == 4 and batch[0].task == episodes[0].task
    for got, want in zip(batch, episodes[:4], strict=True):
        assert got.num_pairs == want.num_pairs and got.source_ids == want.source_ids
        assert all(torch.equal(a, b) for a, b in zip(got.clips(), want.clips(), strict=True))
    # one shared block per batch: a worker sends one file descriptor, not one per clip
    assert len({clip.untyped_storage().data_ptr() for episode in batch for clip in episode.clips()}) == 1
    worker_batch = next(iter(DataLoader(mixture, batch_size=4, collate_fn=collate_episodes, num_workers=1)))
    assert all(torch.equal(a, b) for a, b in zip(worker_batch[3].clips(), episodes[3].clips(), strict=True))
    video_only = TaskMixture(kinds=("video",), num_frames=9, size=SIZE, length=2)
    assert all(task.kind == "video" and task.num_frames == 9 for task in video_only.tasks)
    with pytest.raises(ValueError, match="weights"):
        TaskMixture(tasks=["colorization"], weights=[1, 2])
    with pytest.raises(ValueError, match="num_pairs"):
        TaskMixture(num_pairs=(3, 1))


def test_source_dataset_clips():
    videos = SourceDataset("video", num_frames=5, size=SIZE, length=3, seed=1)
    clip = videos[2]
    assert clip.shape == (3, 5, SIZE, SIZE) and torch.equal(clip, videos[2])
    assert not torch.equal(videos[0], videos[1])
    with pytest.raises(ValueError, match="num_frames"):
        SourceDataset("image", num_frames=5)


def test_colour_tasks_never_draw_greyscale_sources():
    """On a grey source colorization / decolorization are the identity (copy-the-query exact): such sources are redrawn."""
    from genvis.tasks.episodes import is_greyscale

    assert get_task("colorization").colour_sources and get_task("decolorization").colour_sources
    assert not get_task("denoising").colour_sources
    grey_seen = 0
    for seed in range(40):
        for name in ("colorization", "decolorization"):
            episode = sample_episode(name, 2, seed, size=32, split="test")
            colour = [pair[1] if name == "colorization" else pair[0] for pair in episode.context_pairs]
            colour.append(episode.query_target if name == "colorization" else episode.query)
            assert not any(is_greyscale(clip) for clip in colour), (name, seed, episode.source_ids)
        denoise = sample_episode("denoising", 2, seed, size=32, split="test")
        grey_seen += sum(is_greyscale(pair[1]) for pair in denoise.context_pairs)
    assert grey_seen > 0  # the pools do hold grey images: the check above is not vacuous
