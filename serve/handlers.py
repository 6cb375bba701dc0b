"""What each demo tab does, as plain functions of (pipeline, inputs) that tests call directly.

The Gradio wiring lives in ``serve/app.py``; these functions never import gradio. Bad input raises
:class:`serve.validation.InputError`, a missing model :class:`serve.loading.CheckpointLoadError`; both carry the message
the UI shows. Tested in tests/serve/test_handlers.py (tiny random-init pipelines saved and loaded as checkpoints).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from serve.validation import (
    InputError,
    UploadLimits,
    check_int,
    check_number,
    check_text,
    load_image,
    pair_up,
)

__all__ = [
    "MAX_PAIRS",
    "MAX_STEPS",
    "InContextResult",
    "TextToVideoResult",
    "builtin_episode",
    "filmstrip",
    "fit_square",
    "run_builtin_task",
    "run_in_context",
    "run_text_to_video",
    "run_uploaded_task",
]

MAX_PAIRS = 4  # context pairs per request: each adds a full clip of tokens to the joint attention
MAX_STEPS = 50  # sampling steps per request (the official LaVin grid has 20)
MAX_PROMPT_CHARS = 500
MAX_VIDEO_FRAMES = 33


@dataclass
class InContextResult:
    """Result of one in-context request.

    Args:
        prediction: the generated target as one image (frames side by side for a clip).
        gallery: ``(image, caption)`` of everything involved: context pairs, query, prediction, and the exact answer
            when the task knows it.
        message: a one-line summary (task, pairs, steps, seconds).
    """

    prediction: PIL.Image.Image
    gallery: list[tuple[PIL.Image.Image, str]]
    message: str


@dataclass
class TextToVideoResult:
    """Result of one text-to-video request.

    Args:
        video_path: the mp4 written.
        preview: the frames side by side.
        message: a one-line summary.
    """

    video_path: Path
    preview: PIL.Image.Image
    message: str


def filmstrip(frames: Sequence[PIL.Image.Image]) -> PIL.Image.Image:
    """Frames side by side (one frame is returned as is)."""
    if not frames:
        raise ValueError("frames: expected at least one frame, got none")
    if len(frames) == 1:
        return frames[0]
    width, height = frames[0].size
    strip = PIL.Image.new("RGB", (width * len(frames), height))
    for index, frame in enumerate(frames):
        strip.paste(frame.convert("RGB").resize((width, height)), (index * width, 0))
    return strip


def _clip_frames(clip: torch.Tensor) -> list[PIL.Image.Image]:
    """``(3, T, H, W)`` in [-1, 1] -> T PIL frames."""
    from genvis.tasks import to_uint8

    return [PIL.Image.fromarray(frame) for frame in to_uint8(clip)]  # (T, H, W, 3) uint8


def fit_square(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Centre-crop to a square and resize to ``size x size`` (bicubic), so uploads keep their aspect."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.Resampling.BICUBIC)


def builtin_episode(task: str, num_pairs: float, seed: float, size: int):
    """A held-out episode of a built-in task (``genvis.tasks``), checked like a user input."""
    from genvis.tasks import get_task, list_tasks, sample_episode

    names = list_tasks()
    if task not in names:
        raise InputError(f"task: expected one of {', '.join(names)}, got {task!r}")
    pairs = check_int(num_pairs, "context pairs", 1, MAX_PAIRS)
    seed = check_int(seed, "seed", 0, 2**31 - 1)
    return sample_episode(get_task(task), pairs, seed=seed, size=size, split="test")


def run_in_context(
    pipe,
    context_pairs: list[tuple[PIL.Image.Image | torch.Tensor, PIL.Image.Image | torch.Tensor]],
    query: PIL.Image.Image | torch.Tensor,
    steps: float,
    guidance: float,
    seed: float,
    size: int,
) -> tuple[list[PIL.Image.Image], float]:
    """Run the LaVin-DiT pipeline -> (predicted frames, seconds).

    Args:
        pipe: a loaded ``LaVinDiTPipeline``.
        context_pairs: ``[(input, target), ...]`` images (PIL) or clips (``(3, T, H, W)`` in [-1, 1]).
        query: the input to answer.
        steps: Euler steps, 1..:data:`MAX_STEPS`.
        guidance: CFG weight in [0, 10].
        seed: noise seed.
        size: square output resolution.
    """
    steps = check_int(steps, "sampling steps", 1, MAX_STEPS)
    guidance = check_number(guidance, "guidance scale", 0.0, 10.0)
    seed = check_int(seed, "seed", 0, 2**31 - 1)
    start = time.perf_counter()
    try:
        output = pipe(
            context_pairs,
            query,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
        )
    except ValueError as err:  # the pipeline's check_inputs: a mismatch between the request and the model
        raise InputError(f"LaVin-DiT refused the request: {err}") from None
    return list(output.frames), time.perf_counter() - start


def run_builtin_task(
    pipe, task: str, num_pairs: float, seed: float, steps: float, guidance: float, size: int
) -> InContextResult:
    """A built-in task: sample a held-out episode, generate the query's target, show it next to the exact answer."""
    episode = builtin_episode(task, num_pairs, seed, size)
    frames, seconds = run_in_context(pipe, episode.context_pairs, episode.query, steps, guidance, seed, size)
    gallery = []
    for index, (source, target) in enumerate(episode.context_pairs, start=1):
        gallery += [
            (filmstrip(_clip_frames(source)), f"input {index}"),
            (filmstrip(_clip_frames(target)), f"target {index}"),
        ]
    prediction = filmstrip(frames)
    gallery += [
        (filmstrip(_clip_frames(episode.query)), "query"),
        (prediction, "prediction"),
        (filmstrip(_clip_frames(episode.query_target)), "exact answer"),
    ]
    message = (
        f"{task}: {episode.num_pairs} context pair(s), {episode.num_frames} frame(s), "
        f"{int(steps)} steps, {seconds:.1f} s"
    )
    return InContextResult(prediction, gallery, message)


def _path_of(upload) -> str:
    """Gradio may hand a path string or an object with ``.path`` / ``.name`` (its file wrappers)."""
    if isinstance(upload, (str, os.PathLike)):
        return os.fspath(upload)
    for attribute in ("path", "name"):
        if hasattr(upload, attribute):
            return str(getattr(upload, attribute))
    return os.fspath(upload)


def run_uploaded_task(
    pipe,
    context_files: Sequence | None,
    query_file,
    steps: float,
    guidance: float,
    seed: float,
    size: int,
    limits: UploadLimits,
    roots: Iterable[str | os.PathLike],
) -> InContextResult:
    """Uploaded context pairs (``input_1, target_1, input_2, ...``) and a query image -> the query's target."""
    roots = list(roots)
    if query_file is None:
        raise InputError("query image: expected an uploaded image, got nothing")
    files = list(context_files or [])
    if not files:
        raise InputError("context pairs: expected at least one (input, target) pair of images, got none")
    images = [
        fit_square(load_image(_path_of(f), f"context image {i}", limits, roots), size) for i, f in enumerate(files, 1)
    ]
    pairs = pair_up(images, "context pairs", MAX_PAIRS)
    query = fit_square(load_image(_path_of(query_file), "query image", limits, roots), size)
    frames, seconds = run_in_context(pipe, pairs, query, steps, guidance, seed, size)
    prediction = filmstrip(frames)
    gallery = [
        item for index, (a, b) in enumerate(pairs, 1) for item in ((a, f"input {index}"), (b, f"target {index}"))
    ]
    gallery += [(query, "query"), (prediction, "prediction")]
    message = f"uploaded task: {len(pairs)} context pair(s), {int(steps)} steps, {seconds:.1f} s"
    return InContextResult(prediction, gallery, message)


def run_text_to_video(
    pipe,
    prompt: str | None,
    num_frames: float,
    steps: float,
    guidance: float,
    seed: float,
    out_dir: str | os.PathLike,
    fps: float = 8.0,
) -> TextToVideoResult:
    """MVDiT text-to-video -> an mp4 under ``out_dir`` (a fresh name per request) and a frame strip.

    Args:
        pipe: a loaded ``MVDiTPipeline``.
        prompt: the caption.
        num_frames: output frames (the pipeline checks what its VAE accepts).
        steps: denoising steps, 1..:data:`MAX_STEPS`.
        guidance: CFG weight in [0, 20].
        seed: noise seed.
        out_dir: where videos are written (the app's private output folder).
        fps: frame rate of the mp4.
    """
    from genvis.pipelines.pipeline_mvdit import export_video

    prompt = check_text(prompt, "prompt", MAX_PROMPT_CHARS)
    num_frames = check_int(num_frames, "frames", 1, MAX_VIDEO_FRAMES)
    steps = check_int(steps, "sampling steps", 1, MAX_STEPS)
    guidance = check_number(guidance, "guidance scale", 0.0, 20.0)
    seed = check_int(seed, "seed", 0, 2**31 - 1)
    start = time.perf_counter()
    try:
        output = pipe(
            prompt=prompt,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
    except ValueError as err:
        raise InputError(f"MVDiT refused the request: {err}") from None
    video = np.asarray(output.frames[0])  # (T, H, W, 3) in [0, 1]
    seconds = time.perf_counter() - start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = export_video(video, out_dir / f"mvdit-{time.time_ns()}.mp4", fps=fps)
    frames = [PIL.Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8)) for frame in video]
    message = f"{len(frames)} frames at {video.shape[2]}x{video.shape[1]}, {steps} steps, {seconds:.1f} s"
    return TextToVideoResult(path, filmstrip(frames), message)
