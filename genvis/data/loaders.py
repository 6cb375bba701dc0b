"""webdataset loaders for video shards: shard shuffling, node/worker splitting, resampling, bucketing, clip decoding.

Two modes (specs/perf_reliability_ecosystem.md §B3):
- **training** (``resampled=True``): ``ResampledShards(deterministic=True)`` whose seed folds in the run seed and the
  epoch, so a resumed run replays the same order; each rank/worker draws with its own seed (rank * 1000 + worker).
  The epoch length is set with ``with_epoch`` on the ``WebLoader`` (webdataset #303).
- **evaluation** (``resampled=False``): every sample exactly once; shards are permuted by (seed, epoch) identically
  on every rank, then split by node and by worker; fewer shards than ranks x workers is an error naming the numbers.

Decoder: ``decoder="auto"`` (decord, else torchcodec, else PyAV) or one by name; the choice and why is logged once
on ``genvis.data.decoder`` when the dataset is made, and every DataLoader worker uses that same decoder.

Clips: the decoder reads ``num_frames`` frames at ``frame_stride`` (OpenVid: 16 at stride 3, uniform fallback for short
videos), resized to cover and centre-cropped to a resolution bucket; ``causal_vae=True`` requires ``1 + 4k`` frames.
Bad samples (corrupt mp4, missing member, truncated tar) are logged with shard and key, counted, and skipped; a
``max_bad_fraction`` guard stops a run whose data is mostly broken.

Memory: a local shard is read in place. Its video member is handed on as a ``FileSlice`` (shard path, offset, size)
that the decoder opens through FFmpeg's ``subfile`` protocol, so neither the shuffle buffer nor a decode holds a whole
video and a worker's peak memory does not grow with the file size (``benchmarks/data_memory.py``). Remote shards
(``http://``, ``pipe:``) go through webdataset's streaming reader, which holds each member in memory once.
Checked by ``tests/data/test_video_loaders.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from genvis.data.schema import CAPTION_EXT, MANIFEST_NAME, METADATA_EXT, VIDEO_EXTS
from genvis.data.video import FileSlice, VideoSource, log_decoder_choice, read_frames, sample_frame_indices

logger = logging.getLogger(__name__)


class BadSampleError(RuntimeError):
    """A sample that cannot be turned into a clip; the message names the shard, key and reason."""


class TooManyBadSamplesError(RuntimeError):
    """More than ``max_bad_fraction`` of the samples seen were bad."""


class BadSampleHandler:
    """webdataset exception handler: log shard + key + reason, count, continue; abort past ``max_bad_fraction``.

    Each DataLoader worker process holds its own copy, so counts are per worker.

    Args:
        max_bad_fraction: abort when bad / (good + bad) exceeds this, once ``min_samples`` were seen.
        min_samples: samples to see before the fraction guard applies (a single early failure is not a trend).
    """

    def __init__(self, max_bad_fraction: float = 0.2, min_samples: int = 20) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: expected a value in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.good = 0
        self.bad = 0
        self.reasons: list[str] = []

    def __call__(self, error: Exception) -> bool:
        if isinstance(error, TooManyBadSamplesError):
            raise error
        self.bad += 1
        message = f"{type(error).__name__}: {error}"
        self.reasons.append(message)
        logger.warning("skipping bad sample (%d so far): %s", self.bad, message)
        seen = self.good + self.bad
        if seen >= self.min_samples and self.bad / seen > self.max_bad_fraction:
            raise TooManyBadSamplesError(
                f"{self.bad} of {seen} samples were bad (> max_bad_fraction {self.max_bad_fraction}); "
                f"last: {message}. Check the shards with `genvis-shards verify --decode`."
            )
        return True


@dataclass
class ClipConfig:
    """How a sample becomes a clip.

    Args:
        num_frames: frames per clip (a frame bucket list overrides it).
        frame_stride: take every ``frame_stride``-th frame (OpenVid: 3).
        resolution_buckets: (height, width) targets; each video goes to the one closest in aspect ratio.
        frame_buckets: clip lengths; each video gets the longest one that fits in its frames at ``frame_stride``
            (uniform fallback with the shortest when none fits). None means ``[num_frames]``.
        causal_vae: require ``1 + 4k`` frame counts (a causal video VAE keeps frame 0 and compresses the rest by 4).
        position: clip start: ``random`` (seeded per sample), ``start`` or ``center``.
    """

    num_frames: int = 16
    frame_stride: int = 3
    resolution_buckets: list[tuple[int, int]] = field(default_factory=lambda: [(256, 256)])
    frame_buckets: list[int] | None = None
    causal_vae: bool = False
    position: str = "random"

    def __post_init__(self) -> None:
        if not self.resolution_buckets:
            raise ValueError("resolution_buckets: expected at least one (height, width), got []")
        self.resolution_buckets = [tuple(int(side) for side in bucket) for bucket in self.resolution_buckets]
        buckets = sorted(self.frame_buckets or [self.num_frames])
        if buckets[0] < 1:
            raise ValueError(f"frame_buckets: expected counts >= 1, got {buckets}")
        if self.causal_vae:
            bad = [count for count in buckets if (count - 1) % 4]
            if bad:
                raise ValueError(
                    f"frame_buckets: causal_vae=True needs 1 + 4k frames (1, 5, 9, 13, 17, ...), got {bad}"
                )
        self.frame_buckets = buckets


def _sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample RNG: the same clip for (seed, epoch, key) whichever worker or rank decodes it."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def choose_bucket(config: ClipConfig, total_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(num_frames, height, width) bucket of a video: longest fitting clip, closest aspect ratio."""
    fitting = [count for count in config.frame_buckets if (count - 1) * config.frame_stride + 1 <= total_frames]
    num_frames = fitting[-1] if fitting else config.frame_buckets[0]
    aspect = math.log(width / height)
    bucket_h, bucket_w = min(config.resolution_buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))
    return num_frames, bucket_h, bucket_w


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``(T, C, h, w)`` frames to cover ``height`` x ``width`` (bilinear, antialiased), then centre-crop."""
    in_h, in_w = frames.shape[-2:]
    scale = max(height / in_h, width / in_w)
    new_h, new_w = max(height, round(in_h * scale)), max(width, round(in_w * scale))
    if (new_h, new_w) != (in_h, in_w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width]


class ClipDecoder:
    """webdataset map stage: raw sample (``mp4``/``txt``/``json`` bytes) -> clip dict.

    Output: ``video`` (C, T, H, W) float32 in [-1, 1], ``caption`` str, ``metadata`` dict, ``__key__``, ``__url__``.
    """

    def __init__(
        self, config: ClipConfig, handler: BadSampleHandler, seed: int = 0, epoch: int = 0, decoder: str = "auto"
    ) -> None:
        self.config = config
        self.handler = handler
        self.seed = seed
        self.epoch = epoch
        self.decoder = decoder

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        video_ext = next((ext for ext in VIDEO_EXTS if ext in sample), None)
        missing = [ext for ext in (CAPTION_EXT,) if ext not in sample] + ([] if video_ext else ["mp4"])
        if missing:
            raise BadSampleError(f"{url} key {key}: missing member(s) {missing}, got {sorted(sample)}")
        try:
            metadata = json.loads(sample[METADATA_EXT]) if METADATA_EXT in sample else {}
            frames_total, height, width = self._stream_shape(sample[video_ext], metadata, self.decoder)
            num_frames, bucket_h, bucket_w = choose_bucket(self.config, frames_total, height, width)
            indices = sample_frame_indices(
                frames_total,
                num_frames,
                self.config.frame_stride if num_frames > 1 else 1,
                rng=_sample_rng(self.seed, self.epoch, key),
                position=self.config.position,
            )
            frames = read_frames(sample[video_ext], indices, decoder=self.decoder)
        except (RuntimeError, ValueError, IndexError, OSError) as error:
            raise BadSampleError(f"{url} key {key}: {type(error).__name__}: {error}") from error
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, H, W, C) -> (T, C, H, W)
        video = resize_center_crop(video, bucket_h, bucket_w)
        video = (video / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # (T, C, H, W) -> (C, T, H, W)
        self.handler.good += 1
        return {
            "__key__": key,
            "__url__": url,
            "video": video,
            "caption": sample[CAPTION_EXT].decode("utf-8"),
            "metadata": metadata,
            "bucket": (num_frames, bucket_h, bucket_w),
        }

    @staticmethod
    def _stream_shape(video: VideoSource, metadata: dict[str, Any], decoder: str) -> tuple[int, int, int]:
        """(frames, height, width), from the builder's probe fields when present, else from the stream."""
        if all(name in metadata for name in ("probed_frames", "height", "width")):
            return int(metadata["probed_frames"]), int(metadata["height"]), int(metadata["width"])
        from genvis.data.video import video_info

        info = video_info(video, decoder=decoder)
        return info.num_frames, info.height, info.width


# webdataset's rule (``tariterators.base_plus_ext``): the key is the member name up to the first dot of its basename.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _local_tar_path(url: str) -> str | None:
    """The file path of a shard URL on a local file system, None for remote and ``pipe:`` URLs."""
    path = url.removeprefix("file://")
    if "://" in path or path.startswith("pipe:") or not os.path.isfile(path):
        return None
    return path


def _local_tar_samples(path: str, url: str) -> Iterator[dict[str, Any]]:
    """Samples of a local tar shard, grouped as webdataset groups them, with each video member as a ``FileSlice``
    (only its header is read here) and the small members as bytes."""
    file_size = os.path.getsize(path)
    sample: dict[str, Any] | None = None
    with tarfile.open(path, mode="r:") as archive:
        for member in archive:
            match = _MEMBER_NAME.match(member.name)
            if not member.isreg() or match is None or os.path.basename(member.name).startswith("__"):
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if member.offset_data + member.size > file_size:
                raise BadSampleError(
                    f"{url} key {key}: member {member.name} truncated (needs {member.size} bytes at offset "
                    f"{member.offset_data}, the file ends at {file_size})"
                )
            if ext in VIDEO_EXTS:
                sample[ext] = FileSlice(path, member.offset_data, member.size)
            else:
                sample[ext] = archive.extractfile(member).read()
            archive.members = []  # headers already seen are not needed again; keep memory flat over the shard
    if sample is not None:
        yield sample


def tar_samples(handler: BadSampleHandler):
    """Pipeline stage: shard dicts (``{"url": ...}``) -> samples; local shards in place, others via webdataset."""

    def stage(sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            url = source["url"]
            path = _local_tar_path(url)
            if path is None:
                yield from wds.tarfile_to_samples(handler=handler)(iter([source]))
                continue
            try:
                yield from _local_tar_samples(path, url)
            except (tarfile.TarError, OSError, BadSampleError) as error:
                if not handler(BadSampleError(f"{url}: {type(error).__name__}: {error}")):
                    raise

    return stage


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-bucket clips: ``video`` (B, C, T, H, W); ``caption``, ``__key__``, ``metadata`` as lists."""
    return {
        "video": torch.stack([sample["video"] for sample in samples]),
        "caption": [sample["caption"] for sample in samples],
        "__key__": [sample["__key__"] for sample in samples],
        "metadata": [sample["metadata"] for sample in samples],
        "bucket": samples[0]["bucket"],
    }


def bucket_batches(samples: Iterator[dict[str, Any]], batch_size: int, drop_last: bool) -> Iterator[dict[str, Any]]:
    """Group clips by their (frames, height, width) bucket and yield a batch whenever a bucket fills up."""
    pending: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for sample in samples:
        group = pending.setdefault(sample["bucket"], [])
        group.append(sample)
        if len(group) == batch_size:
            yield collate_clips(group)
            pending[sample["bucket"]] = []
    if not drop_last:
        for group in pending.values():
            if group:
                yield collate_clips(group)


def resolve_shards(shards: str | Path | list[str]) -> list[str]:
    """Shard URLs from a shard folder (its manifest, else ``*.tar``), a brace pattern (``{000000..000009}``) or a list."""
    if isinstance(shards, list | tuple):
        urls = [str(url) for url in shards]
    elif Path(shards).is_dir():
        folder = Path(shards)
        manifest = folder / MANIFEST_NAME
        if manifest.is_file():
            urls = [str(folder / entry["name"]) for entry in json.loads(manifest.read_text())["shards"]]
        else:
            urls = sorted(str(path) for path in folder.glob("*.tar"))
    else:
        urls = list(wds.shardlists.expand_urls(str(shards)))
    if not urls:
        raise FileNotFoundError(f"shards: no .tar shards found in {shards!r}")
    return urls


def _distributed_world() -> tuple[int, int]:
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


def make_video_dataset(
    shards: str | Path | list[str],
    clip: ClipConfig | None = None,
    batch_size: int = 4,
    resampled: bool = True,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 64,
    num_workers: int = 0,
    max_bad_fraction: float = 0.2,
    drop_last: bool | None = None,
    decoder: str = "auto",
) -> wds.DataPipeline:
    """The batched webdataset pipeline (use ``make_video_loader`` for the DataLoader around it).

    Args:
        shards: shard folder, brace pattern or list of URLs.
        clip: clip sampling and bucketing.
        batch_size: clips per batch (batches hold one bucket each).
        resampled: training mode (endless, resampled shards) vs exactly-once evaluation.
        seed: run seed; the same seed, epoch and worker count give the same batches.
        epoch: folded into every seed, so a resumed run continues the order of its epoch.
        shuffle_buffer: samples in the shuffle buffer (0 disables sample shuffling).
        num_workers: DataLoader workers that will iterate this dataset (checked against the shard count).
        max_bad_fraction: abort when more than this fraction of samples is bad.
        drop_last: drop incomplete bucket batches (default: True when resampled).
        decoder: ``auto`` (decord, else torchcodec, else PyAV) or one of them; resolved and logged here, once.

    Raises:
        DecoderUnavailableError: the requested decoder (for ``auto``: every decoder) is not installed.
    """
    clip = clip or ClipConfig()
    urls = resolve_shards(shards)
    handler = BadSampleHandler(max_bad_fraction=max_bad_fraction)
    chosen = log_decoder_choice("video loader", decoder)
    clip_decoder = ClipDecoder(clip, handler, seed=seed, epoch=epoch, decoder=chosen)
    drop_last = resampled if drop_last is None else drop_last
    # webdataset's make_seed mixes ints with hash(); ints hash to themselves, so seeds are stable across processes.
    epoch_seed = seed * 1_000_003 + epoch
    if resampled:
        stages: list[Any] = [
            wds.ResampledShards(urls, seed=epoch_seed, deterministic=True),
            tar_samples(handler),
        ]
    else:
        _, world_size = _distributed_world()
        needed = world_size * max(1, num_workers)
        if len(urls) < needed:
            raise ValueError(
                f"shards: exactly-once loading needs at least ranks x workers = {world_size} x {max(1, num_workers)} "
                f"= {needed} shards, got {len(urls)} in {shards!r}; use resampled=True, fewer workers or smaller shards"
            )
        # The same permutation on every rank (seeded by seed and epoch only), then split by node and by worker.
        order = np.random.default_rng([seed, epoch]).permutation(len(urls)) if shuffle_buffer else range(len(urls))
        stages = [
            wds.SimpleShardList([urls[i] for i in order]),  # already permuted above, identically on all ranks
            wds.split_by_node,
            wds.split_by_worker,
            tar_samples(handler),
        ]
    if shuffle_buffer:
        stages.append(wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 16), seed=epoch_seed))
    stages += [
        wds.map(clip_decoder, handler=handler),
        wds.pipelinefilter(bucket_batches)(batch_size, drop_last),
    ]
    return wds.DataPipeline(*stages)


def make_video_loader(
    shards: str | Path | list[str],
    clip: ClipConfig | None = None,
    batch_size: int = 4,
    num_workers: int = 2,
    resampled: bool = True,
    batches_per_epoch: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 64,
    max_bad_fraction: float = 0.2,
    timeout_s: float = 0.0,
    decoder: str = "auto",
) -> wds.WebLoader:
    """A ``wds.WebLoader`` yielding bucketed clip batches (see ``make_video_dataset`` for the arguments).

    Args:
        batches_per_epoch: required when ``resampled``: ``with_epoch`` on the loader (not the dataset, webdataset
            #303) makes the endless stream end after this many batches, identically on every rank.
        timeout_s: DataLoader timeout, so a worker stuck in a decoder fails loudly instead of hanging training.
    """
    if resampled and not batches_per_epoch:
        raise ValueError("batches_per_epoch: expected a positive int for a resampled (endless) loader, got None")
    dataset = make_video_dataset(
        shards,
        clip=clip,
        batch_size=batch_size,
        resampled=resampled,
        seed=seed,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
        max_bad_fraction=max_bad_fraction,
        decoder=decoder,
    )
    loader = wds.WebLoader(
        dataset,
        batch_size=None,  # batches are formed per bucket inside the pipeline
        num_workers=num_workers,
        timeout=timeout_s if num_workers > 0 else 0,
        persistent_workers=False,
    )
    if resampled:
        loader = loader.with_epoch(batches_per_epoch)
    return loader
