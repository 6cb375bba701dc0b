"""Video IO, clip sampling and the webdataset loaders (determinism, exactly-once, bucketing, bad samples)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipelines.build import BuildConfig, build_shards
from genvis.data.builtin import procedural_video
from genvis.data.loaders import (
    ClipConfig,
    TooManyBadSamplesError,
    choose_bucket,
    make_video_dataset,
    make_video_loader,
)
from genvis.data.video import causal_vae_num_frames, encode_mp4, read_frames, sample_frame_indices, video_info

KEYS = [f"proc_{i:05d}" for i in range(6)]


@pytest.fixture(scope="module")
def shard_dir(procedural_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six procedural clips in three 2-sample shards."""
    out = tmp_path_factory.mktemp("shards")
    config = BuildConfig(
        str(procedural_root / "openvid.csv"), str(procedural_root / "videos"), str(out), shard_max_count=2
    )
    build_shards(config, progress=False)
    return out


def test_frame_index_sampling() -> None:
    rng = np.random.default_rng(0)
    indices = sample_frame_indices(100, 16, 3, rng=rng)
    assert len(indices) == 16 and np.all(np.diff(indices) == 3) and indices[-1] < 100
    assert sample_frame_indices(48, 16, 3, position="start").tolist() == list(range(0, 46, 3))
    # Too short for 16 frames at stride 3: uniform over the whole clip (OpenVid's fallback), first and last included.
    fallback = sample_frame_indices(20, 16, 3)
    assert fallback[0] == 0 and fallback[-1] == 19 and len(fallback) == 16
    assert [causal_vae_num_frames(n) for n in (1, 4, 5, 16, 17)] == [1, 1, 5, 13, 17]
    with pytest.raises(ValueError, match="num_frames and stride"):
        sample_frame_indices(10, 0)


def test_decord_and_pyav_agree_on_written_mp4() -> None:
    frames = procedural_video(0, num_frames=9, size=32).frames
    mp4 = encode_mp4(frames, fps=8)
    info = video_info(mp4)
    assert (info.num_frames, info.width, info.height, info.fps) == (9, 32, 32, 8.0)
    decoded = read_frames(mp4, [0, 4, 8], decoder="decord")
    assert np.array_equal(decoded, read_frames(mp4, [0, 4, 8], decoder="pyav"))
    # crf 18 H.264 of flat shapes: close to the source (yuv420 chroma subsampling blurs edges a little).
    assert np.abs(decoded.astype(int) - frames[[0, 4, 8]]).mean() < 6


def test_training_loader_is_deterministic_and_bucketed(shard_dir: Path) -> None:
    clip = ClipConfig(frame_stride=1, resolution_buckets=[(16, 16), (16, 32)], frame_buckets=[5, 9], causal_vae=True)

    def keys(seed: int, epoch: int) -> list[list[str]]:
        loader = make_video_loader(
            shard_dir, clip, batch_size=2, num_workers=2, batches_per_epoch=4, seed=seed, epoch=epoch
        )
        batches = list(loader)
        assert len(batches) == 4
        for batch in batches:
            assert batch["video"].shape == (2, 3, 9, 16, 16)  # 9 frames fit, square clips -> square bucket
            assert batch["video"].dtype == torch.float32 and batch["video"].abs().max() <= 1.0
            assert len(batch["caption"]) == 2 and batch["caption"][0].startswith("a")
        return [batch["__key__"] for batch in batches]

    first = keys(seed=1, epoch=0)
    assert keys(seed=1, epoch=0) == first
    assert keys(seed=1, epoch=1) != first  # the epoch is folded into the seed
    assert choose_bucket(clip, total_frames=7, height=90, width=160) == (5, 16, 32)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ClipConfig(frame_buckets=[8], causal_vae=True)


def test_evaluation_loader_yields_each_sample_once(shard_dir: Path) -> None:
    clip = ClipConfig(num_frames=4, frame_stride=2, resolution_buckets=[(16, 16)])
    loader = make_video_loader(shard_dir, clip, batch_size=4, num_workers=2, resampled=False, seed=5)
    seen = [key for batch in loader for key in batch["__key__"]]
    assert sorted(seen) == KEYS
    with pytest.raises(ValueError, match=r"ranks x workers = 1 x 4 = 4 shards, got 3"):
        make_video_dataset(shard_dir, clip, resampled=False, num_workers=4)
    # Same seed, same order; the shard permutation follows (seed, epoch).
    again = make_video_dataset(shard_dir, clip, batch_size=1, resampled=False, seed=5)
    other = make_video_dataset(shard_dir, clip, batch_size=1, resampled=False, seed=5)
    assert [b["__key__"] for b in again] == [b["__key__"] for b in other]


def _corrupt_copy(shard_dir: Path, out: Path) -> list[str]:
    """Rewrite the shards with one corrupt mp4, one sample missing its mp4, and a truncated last shard."""
    out.mkdir()
    good: list[str] = []
    urls = sorted(str(path) for path in shard_dir.glob("*.tar"))
    for number, url in enumerate(urls):
        with wds.TarWriter(str(out / Path(url).name)) as writer:
            for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
                sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                if sample["__key__"] == "proc_00001":
                    sample["mp4"] = sample["mp4"][:200]  # corrupt video bytes
                elif sample["__key__"] == "proc_00002":
                    del sample["mp4"]  # member missing
                else:
                    good.append(sample["__key__"])
                writer.write(sample)
        if number == len(urls) - 1:
            data = (out / Path(url).name).read_bytes()
            (out / Path(url).name).write_bytes(data[: len(data) // 2 + 700])  # cut inside the second sample
    return good


def test_bad_samples_are_reported_and_skipped(
    shard_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _corrupt_copy(shard_dir, tmp_path / "bad")
    clip = ClipConfig(num_frames=4, frame_stride=1, resolution_buckets=[(16, 16)])
    with caplog.at_level(logging.WARNING, logger="genvis.data.loaders"):
        dataset = make_video_dataset(tmp_path / "bad", clip, batch_size=1, resampled=False, max_bad_fraction=1.0)
        seen = [batch["__key__"][0] for batch in dataset]
    assert sorted(seen) == sorted(set(good) - {"proc_00005"})  # proc_00005 sits after the cut in the last shard
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "key proc_00001" in messages and "000000.tar" in messages
    assert "key proc_00002: missing member(s) ['mp4']" in messages
    # A mostly broken dataset stops the run with a clear error instead of training on scraps.
    broken = make_video_dataset(tmp_path / "bad", clip, batch_size=1, resampled=True, max_bad_fraction=0.0)
    broken_iter = iter(broken)
    with pytest.raises(TooManyBadSamplesError, match=r"max_bad_fraction 0\.0"):
        for _ in range(200):
            next(broken_iter)


def test_clip_content_follows_the_metadata(shard_dir: Path) -> None:
    """A centre clip read through the loader equals a direct decord read of the same frames, resized."""
    clip = ClipConfig(num_frames=3, frame_stride=4, resolution_buckets=[(32, 32)], position="start")
    dataset = make_video_dataset(shard_dir, clip, batch_size=1, resampled=False, shuffle_buffer=0)
    batch = next(iter(dataset))
    sample = next(iter(wds.WebDataset(str(shard_dir / "000000.tar"), shardshuffle=False)))
    assert batch["__key__"] == [sample["__key__"]]
    direct = read_frames(sample["mp4"], [0, 4, 8])
    expected = torch.from_numpy(direct).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    assert torch.allclose(batch["video"][0], expected, atol=1e-5)
    assert batch["metadata"][0] == json.loads(sample["json"])
    assert io.BytesIO(sample["mp4"]).getbuffer().nbytes > 0
