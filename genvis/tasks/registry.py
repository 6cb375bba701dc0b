"""The in-context task registry: ``TASKS``, ``get_task`` and ``list_tasks``.

Each ``InContextTask`` turns a ``TaskSource`` (``genvis.tasks.sources``) into an ``(input, target)`` pair of
``(3, T, H, W)`` clips in ``[-1, 1]`` with an exact target (computed from the source or from the generator's labels,
never predicted by a model). See the README section "ST-VAE and in-context tasks" for the table of tasks. Checked by
``tests/tasks/test_tasks.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch

from genvis.tasks.ops import (
    add_gaussian_noise,
    binary_map,
    canny_edges,
    depth_order_map,
    down_up,
    fill_box,
    gaussian_blur,
    grayscale,
)
from genvis.tasks.sources import SOURCE_KINDS, SourceKind, TaskSource

TaskKind = Literal["image", "video"]
PairBuilder = Callable[[TaskSource, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]

# Gaussian noise of std 25/255 on [0, 1] images (the classic sigma=25 denoising benchmark), in [-1, 1] units.
NOISE_SIGMA = 2 * 25 / 255
# Blur std in pixels of the task resolution: visibly soft at 32-64 px but still invertible in spirit.
BLUR_SIGMA = 1.5
# Inpainting hole side as a fraction of the image side (height and width drawn independently).
INPAINT_BOX_FRACTION: tuple[float, float] = (0.25, 0.5)
# Hole fill: mid-grey, the value of an empty latent-free pixel in [-1, 1].
INPAINT_FILL = 0.0
DEFAULT_VIDEO_FRAMES = 5


@dataclass(frozen=True)
class InContextTask:
    """One in-context task: how to draw a source and turn it into an (input, target) pair.

    Args:
        name: registry key.
        kind: ``"image"`` (``T = 1``) or ``"video"``.
        source: which pool feeds it (``genvis.tasks.sources``): ``image``, ``scene``, ``video`` or ``procedural_video``.
        input_description: what the input shows.
        target_description: what the target shows.
        build_pair: ``(source, rng) -> (input, target)``; pure given the source and the generator state.
        num_frames: frames of the input and of the target (1 for images; 1+4k suits the causal ST-VAE).
        source_windows: source frames = ``source_windows * num_frames`` (frame prediction reads input + future).
        min_frames: smallest ``num_frames`` for which the task is defined.
        reverse_of: name of the task this one inverts, if any.
        colour_sources: draw only sources with colour (greyscale ones are redrawn): on a grey source colorization and
            decolorization are the identity, which teaches nothing and makes copy-the-query exact.
    """

    name: str
    kind: TaskKind
    source: SourceKind
    input_description: str
    target_description: str
    build_pair: PairBuilder = field(repr=False, compare=False)
    num_frames: int = 1
    source_windows: int = 1
    min_frames: int = 1
    reverse_of: str | None = None
    colour_sources: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise ValueError(f"{self.name}.kind: expected 'image' or 'video', got {self.kind!r}")
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"{self.name}.source: expected one of {SOURCE_KINDS}, got {self.source!r}")
        if self.kind == "image" and self.num_frames != 1:
            raise ValueError(f"{self.name}.num_frames: image tasks have exactly 1 frame, got {self.num_frames}")
        if self.num_frames < self.min_frames:
            raise ValueError(f"{self.name}.num_frames: expected >= {self.min_frames}, got {self.num_frames}")

    @property
    def source_num_frames(self) -> int:
        """Frames of the source clip this task consumes."""
        return self.source_windows * self.num_frames

    def with_num_frames(self, num_frames: int) -> InContextTask:
        """A copy with another clip length (video tasks; e.g. 9 = 1 + 4 * 2 for the ST-VAE)."""
        return dataclasses.replace(self, num_frames=num_frames)

    def make_pair(self, source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn ``source`` into ``(input, target)``, both ``(3, num_frames, H, W)`` float in ``[-1, 1]``.

        Args:
            source: a sample of the pool ``self.source`` with ``self.source_num_frames`` frames.
            rng: drives the random parts (noise seed, hole position); same state -> same pair.
        """
        pixels = source.pixels
        if pixels.ndim != 4 or pixels.shape[0] != 3 or pixels.shape[1] != self.source_num_frames:
            raise ValueError(
                f"{self.name}: source.pixels expected shape (3, {self.source_num_frames}, H, W), "
                f"got {tuple(pixels.shape)}"
            )
        if self.source in ("scene", "procedural_video") and (
            source.foreground_mask is None or source.layer_ids is None
        ):
            raise ValueError(
                f"{self.name}: source {source.source_id!r} has no labels; this task needs a labelled source"
            )
        task_input, target = self.build_pair(source, rng)
        expected = (3, self.num_frames, *pixels.shape[-2:])
        for label, clip in (("input", task_input), ("target", target)):
            if tuple(clip.shape) != expected:
                raise ValueError(f"{self.name}: {label} expected shape {expected}, got {tuple(clip.shape)}")
        return task_input.contiguous(), target.contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Pair builders (top-level functions so tasks pickle into DataLoader workers)


def _colorization(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return grayscale(source.pixels), source.pixels


def _decolorization(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return source.pixels, grayscale(source.pixels)


def _edge_detection(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return source.pixels, canny_edges(source.pixels)


def _denoising(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    noisy = add_gaussian_noise(source.pixels, NOISE_SIGMA, seed=int(rng.integers(2**62)))
    return noisy, source.pixels


def _deblurring(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return gaussian_blur(source.pixels, BLUR_SIGMA), source.pixels


def _blurring(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return source.pixels, gaussian_blur(source.pixels, BLUR_SIGMA)


def _inpainting(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = source.pixels.shape[-2:]
    low, high = INPAINT_BOX_FRACTION
    box_height = round(rng.uniform(low, high) * height)
    box_width = round(rng.uniform(low, high) * width)
    top, left = int(rng.integers(0, height - box_height + 1)), int(rng.integers(0, width - box_width + 1))
    return fill_box(source.pixels, (top, left, box_height, box_width), INPAINT_FILL), source.pixels


def _super_resolution(source: TaskSource, rng: np.random.Generator, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    return down_up(source.pixels, factor), source.pixels


def _downsampling(source: TaskSource, rng: np.random.Generator, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    return source.pixels, down_up(source.pixels, factor)


def _foreground_segmentation(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return source.pixels, binary_map(source.foreground_mask)


def _depth_order(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return source.pixels, depth_order_map(source.layer_ids)


def _frame_prediction(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    half = source.pixels.shape[1] // 2
    return source.pixels[:, :half], source.pixels[:, half:]


def _past_frame_prediction(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    future, past = _frame_prediction(source, rng)[::-1]
    return future, past


def _frame_interpolation(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Odd frames are missing and show the previous even frame (a half-frame-rate clip played at full rate).
    num_frames = source.pixels.shape[1]
    held = torch.arange(num_frames) - torch.arange(num_frames) % 2
    return source.pixels[:, held], source.pixels


def _video_reversal(source: TaskSource, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return source.pixels, source.pixels.flip(1)


def _task_list() -> tuple[InContextTask, ...]:
    image = {"kind": "image", "source": "image"}
    scene = {"kind": "image", "source": "scene"}
    video = {"kind": "video", "source": "video", "num_frames": DEFAULT_VIDEO_FRAMES}
    labelled_video = {"kind": "video", "source": "procedural_video", "num_frames": DEFAULT_VIDEO_FRAMES}
    return (
        InContextTask("colorization", **image, input_description="greyscale (BT.601 luma in 3 channels)",
                      target_description="the RGB image", build_pair=_colorization, colour_sources=True),
        InContextTask("decolorization", **image, input_description="RGB image", target_description="its greyscale",
                      build_pair=_decolorization, reverse_of="colorization", colour_sources=True),
        InContextTask("edge_detection", **image, input_description="RGB image",
                      target_description="binary Canny edges (sigma 1.5) of its luma, white on black",
                      build_pair=_edge_detection),
        InContextTask("denoising", **image, input_description="image + Gaussian noise (std 25/255, seeded)",
                      target_description="the clean image", build_pair=_denoising),
        InContextTask("deblurring", **image, input_description=f"Gaussian-blurred image (sigma {BLUR_SIGMA} px)",
                      target_description="the sharp image", build_pair=_deblurring),
        InContextTask("blurring", **image, input_description="sharp image",
                      target_description=f"its Gaussian blur (sigma {BLUR_SIGMA} px)", build_pair=_blurring,
                      reverse_of="deblurring"),
        InContextTask("inpainting", **image, input_description="image with a mid-grey box (25-50 % of each side)",
                      target_description="the full image", build_pair=_inpainting),
        InContextTask("super_resolution_x2", **image, input_description="x2 bicubic downscale, upscaled back",
                      target_description="the full-resolution image", build_pair=partial(_super_resolution, factor=2)),
        InContextTask("super_resolution_x4", **image, input_description="x4 bicubic downscale, upscaled back",
                      target_description="the full-resolution image", build_pair=partial(_super_resolution, factor=4)),
        InContextTask("downsampling_x4", **image, input_description="full-resolution image",
                      target_description="its x4 bicubic downscale, upscaled back",
                      build_pair=partial(_downsampling, factor=4), reverse_of="super_resolution_x4"),
        InContextTask("foreground_segmentation", **scene, input_description="procedural scene",
                      target_description="exact foreground mask, white on black", build_pair=_foreground_segmentation),
        InContextTask("depth_order", **scene, input_description="procedural scene of overlapping shapes",
                      target_description="front-most layer per pixel as grey levels (brighter = nearer, 4 levels)",
                      build_pair=_depth_order),
        InContextTask("frame_prediction", **video, source_windows=2, input_description="T frames of a clip",
                      target_description="the next T frames", build_pair=_frame_prediction),
        InContextTask("past_frame_prediction", **video, source_windows=2, input_description="T frames of a clip",
                      target_description="the T frames before them", build_pair=_past_frame_prediction,
                      reverse_of="frame_prediction"),
        InContextTask("frame_interpolation", **video, min_frames=3,
                      input_description="clip whose odd frames repeat the previous even frame",
                      target_description="the full-rate clip", build_pair=_frame_interpolation),
        InContextTask("video_reversal", **video, input_description="clip", target_description="the clip played backwards",
                      build_pair=_video_reversal, reverse_of="video_reversal"),
        InContextTask("video_colorization", **video, input_description="greyscale clip",
                      target_description="the RGB clip", build_pair=_colorization, colour_sources=True),
        InContextTask("video_foreground_segmentation", **labelled_video, input_description="procedural video",
                      target_description="exact per-frame foreground masks, white on black",
                      build_pair=_foreground_segmentation),
    )  # fmt: skip


TASKS: dict[str, InContextTask] = {task.name: task for task in _task_list()}


def list_tasks(kind: TaskKind | None = None) -> list[str]:
    """Registered task names (all, or only ``kind``), in registration order."""
    if kind not in (None, "image", "video"):
        raise ValueError(f"kind: expected None, 'image' or 'video', got {kind!r}")
    return [name for name, task in TASKS.items() if kind is None or task.kind == kind]


def get_task(name: str | InContextTask, num_frames: int | None = None) -> InContextTask:
    """Look up a task by name (an ``InContextTask`` passes through), optionally with another clip length.

    Raises:
        ValueError: unknown name (the message lists close matches and every task).
    """
    if isinstance(name, InContextTask):
        task = name
    elif name in TASKS:
        task = TASKS[name]
    else:
        close = difflib.get_close_matches(str(name), list(TASKS), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"task: unknown name {name!r}.{hint} Known: {list(TASKS)}")
    return task if num_frames is None or num_frames == task.num_frames else task.with_num_frames(num_frames)
