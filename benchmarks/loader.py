"""Clips/s of the genvis shard loader vs naive per-file loaders (PyAV full decode, per-file decord), one run.

Data: procedural H.264 clips (default 40 clips, 64 frames, 192x192 @ 24 fps) written as an OpenVid CSV + mp4 folder
and built into shards with ``genvis-shards``' ``build_shards``. Every loader returns the same thing: 16 frames at
stride 3 (OpenVid's sampling), resized and centre-cropped to 128x128, as a float tensor in [-1, 1].

- ``naive PyAV``: per file, ``av.open`` + decode every frame + pick the 16 (Open-Sora's ``read_video_av`` pattern).
- ``naive decord``: per file, ``decord.VideoReader(path).get_batch(indices)``.
- ``genvis shards``: ``make_video_dataset`` over the tar shards (decord from in-memory bytes), one process, and
  ``make_video_loader`` with 2 DataLoader workers.

Local disk and a warm page cache favour per-file reads; shards win on network/object storage, which this does not
measure (specs/perf_reliability_ecosystem.md §A7). Run: ``python benchmarks/loader.py [--clips 40]``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipelines.build import BuildConfig, build_shards
from genvis.data.builtin import write_procedural_dataset
from genvis.data.loaders import ClipConfig, make_video_dataset, make_video_loader, resize_center_crop
from genvis.data.video import read_frames, sample_frame_indices

NUM_FRAMES, STRIDE, SIZE = 16, 3, 128


def _to_clip(frames: np.ndarray) -> torch.Tensor:
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, H, W, C) -> (T, C, H, W)
    return (resize_center_crop(video, SIZE, SIZE) / 127.5 - 1.0).permute(1, 0, 2, 3)  # -> (C, T, H, W)


def naive_clips(paths: list[Path], backend: str) -> Iterator[torch.Tensor]:
    rng = np.random.default_rng(0)
    for path in paths:
        if backend == "pyav":
            frames = read_frames(path, decoder="pyav")  # full decode, then pick
            indices = sample_frame_indices(len(frames), NUM_FRAMES, STRIDE, rng=rng)
            yield _to_clip(frames[indices])
        else:
            import decord

            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            indices = sample_frame_indices(len(reader), NUM_FRAMES, STRIDE, rng=rng)
            yield _to_clip(reader.get_batch(indices.tolist()).asnumpy())


def _time(name: str, make: Callable[[], Iterator], count_of: Callable[[object], int]) -> float:
    start = time.perf_counter()
    clips = sum(count_of(item) for item in make())
    seconds = time.perf_counter() - start
    print(f"{name:<34} {clips:>4} clips {seconds:7.2f} s {clips / seconds:8.1f} clips/s")
    return clips / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv_path = write_procedural_dataset(root / "src", args.clips, args.frames, args.size, seed=0, fps=24.0)
        with open(csv_path, newline="") as handle:
            paths = [root / "src" / "videos" / row["video"] for row in csv.DictReader(handle)]
        config = BuildConfig(str(csv_path), str(root / "src" / "videos"), str(root / "shards"), shard_max_count=10)
        build_shards(config, progress=False)
        clip = ClipConfig(num_frames=NUM_FRAMES, frame_stride=STRIDE, resolution_buckets=[(SIZE, SIZE)])
        print(
            f"{args.clips} clips, {args.frames} frames {args.size}x{args.size} -> {NUM_FRAMES} frames @ stride {STRIDE}"
        )
        one = lambda _clip: 1  # noqa: E731
        per_batch = lambda batch: len(batch["__key__"])  # noqa: E731
        pyav = _time("naive per-file PyAV (full decode)", lambda: naive_clips(paths, "pyav"), one)
        decord_rate = _time("naive per-file decord", lambda: naive_clips(paths, "decord"), one)
        shards = _time(
            "genvis shards, 1 process",
            lambda: make_video_dataset(root / "shards", clip, batch_size=1, resampled=False, shuffle_buffer=0),
            per_batch,
        )
        workers = _time(
            "genvis shards, WebLoader 2 workers",
            lambda: make_video_loader(root / "shards", clip, batch_size=1, num_workers=2, resampled=False),
            per_batch,
        )
    print(f"ratio genvis shards / naive PyAV:   {shards / pyav:.2f}x (1 process), {workers / pyav:.2f}x (2 workers)")
    print(f"ratio genvis shards / naive decord: {shards / decord_rate:.2f}x (1 process)")


if __name__ == "__main__":
    main()
