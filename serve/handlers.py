"""What each demo tab does, as plain functions of (pipeline, inputs) that tests call directly.

The Gradio wiring lives in ``serve/app.py``; these functions never import gradio. Bad input raises
:class:`serve.validation.InputError`, a missing model :class:`serve.loading.CheckpointLoadError`; both carry the message
the UI shows. Tested in tests/serve/test_handlers.py (tiny random-init pipelines saved and loaded as checkpoints).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from genvis.diffusion import DEFAULT_TIME_GRID, LAVIN_DIT_TIME_GRIDS
from serve.validation import (
    InputError,
    UploadLimits,
    check_choice,
    check_int,
    check_number,
    check_text,
    load_image,
    pair_up,
)

__all__ = [
    "DEFAULT_GUIDANCE",
    "DISPLAY_SIDE",
    "MAX_NEW_TOKENS",
    "MAX_PAIRS",
    "MAX_STEPS",
    "TIME_GRIDS",
    "UNIFORM_GRID",
    "InContextResult",
    "SamplingDefaults",
    "TextToVideoResult",
    "TrainedTasks",
    "builtin_episode",
    "filmstrip",
    "fit_square",
    "inspect_encoder",
    "labelled_row",
    "preview_uploads",
    "run_builtin_task",
    "run_chat",
    "run_encoder_inspection",
    "run_in_context",
    "run_text_to_video",
    "run_uploaded_task",
    "sampler_arguments",
    "sampling_defaults",
    "trained_tasks",
    "upscale",
]

MAX_PAIRS = 4  # context pairs per request: each adds a full clip of tokens to the joint attention
MAX_STEPS = 50  # sampling steps per request on the uniform grid (the official LaVin grids have 19, 29 and 39)
MAX_PROMPT_CHARS = 500
MAX_VIDEO_FRAMES = 33
UNIFORM_GRID = "uniform"  # diffusers' uniform grid with a chosen number of steps (``num_inference_steps``)
TIME_GRIDS = (*LAVIN_DIT_TIME_GRIDS, UNIFORM_GRID)  # the official grids by name first, "lavin-20" the default
DEFAULT_GUIDANCE = 1.5  # LaVinDiTPipeline's default CFG weight
DISPLAY_SIDE = 256  # px: images are shown at least this tall; tiny checkpoints work at 32 px


@dataclass
class InContextResult:
    """Result of one in-context request.

    Args:
        prediction: the generated target at the model's resolution (frames side by side for a clip).
        comparison: what the tab shows first: query, prediction and (built-in tasks) the exact answer, each labelled
            and upscaled with nearest-neighbour to at least :data:`DISPLAY_SIDE` px (:func:`labelled_row`).
        gallery: ``(image, caption)`` of everything involved, upscaled the same way: context pairs (``input 1``,
            ``target 1``, ...), query, prediction, and the exact answer when the task knows it.
        message: a one-line summary (task, pairs, time grid and steps, guidance, seconds).
    """

    prediction: PIL.Image.Image
    comparison: PIL.Image.Image
    gallery: list[tuple[PIL.Image.Image, str]]
    message: str


@dataclass(frozen=True)
class TrainedTasks:
    """The built-in tasks a LaVin-DiT checkpoint was trained on, as the demo lists them.

    Args:
        names: task names in training order (the dropdown's choices and the examples' source).
        from_config: whether they were read from the run's training config (False: a fallback list).
        note: one line for the tab saying where the list comes from.
    """

    names: list[str]
    from_config: bool
    note: str


@dataclass(frozen=True)
class SamplingDefaults:
    """The LaVin-DiT tab's sampling defaults.

    Args:
        time_grid: one of :data:`TIME_GRIDS`.
        steps: steps on the uniform grid (used only when ``time_grid`` is :data:`UNIFORM_GRID`).
        guidance: CFG weight.
        note: one line saying where they come from.
    """

    time_grid: str
    steps: int
    guidance: float
    note: str


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


def upscale(image: PIL.Image.Image, min_side: int = DISPLAY_SIDE) -> PIL.Image.Image:
    """Nearest-neighbour upscaling by the smallest whole factor that makes the shorter side >= ``min_side``.

    A whole factor keeps every model pixel a sharp square block: the browser would blur a 32 px output it stretches.
    """
    width, height = image.size
    factor = max(1, math.ceil(min_side / max(1, min(width, height))))
    if factor == 1:
        return image
    return image.resize((width * factor, height * factor), PIL.Image.Resampling.NEAREST)


_CAPTION_HEIGHT = 30  # px above each panel of a labelled row
_PANEL_GAP = 12  # px between panels


def labelled_row(panels: Sequence[tuple[PIL.Image.Image, str]], min_side: int = DISPLAY_SIDE) -> PIL.Image.Image:
    """Panels with a caption above each, upscaled (:func:`upscale`) and laid out side by side on white.

    Panels are brought to the first one's display size, so a prediction sits at the same scale as its query.
    Filmstrips (clips, wider than twice their height) are stacked top to bottom instead, one per row.
    """
    if not panels:
        raise ValueError("panels: expected at least one (image, caption), got none")
    first = upscale(panels[0][0].convert("RGB"), min_side)
    width, height = first.size
    images = [first] + [image.convert("RGB").resize((width, height), PIL.Image.Resampling.NEAREST)
                        for image, _ in panels[1:]]  # fmt: skip
    stacked = width > 2 * height
    cell_w, cell_h = width, height + _CAPTION_HEIGHT
    count = len(images)
    canvas_size = (cell_w, count * cell_h + (count - 1) * _PANEL_GAP) if stacked else (
        count * cell_w + (count - 1) * _PANEL_GAP, cell_h)  # fmt: skip
    canvas = PIL.Image.new("RGB", canvas_size, (255, 255, 255))
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default(size=20)
    for index, (image, (_, caption)) in enumerate(zip(images, panels, strict=True)):
        left, top = (0, index * (cell_h + _PANEL_GAP)) if stacked else (index * (cell_w + _PANEL_GAP), 0)
        draw.text((left + 4, top + 4), caption, fill=(0, 0, 0), font=font)
        canvas.paste(image, (left, top + _CAPTION_HEIGHT))
    return canvas


def _shown(items: Sequence[tuple[PIL.Image.Image, str]]) -> list[tuple[PIL.Image.Image, str]]:
    """Gallery items upscaled for display."""
    return [(upscale(image.convert("RGB")), caption) for image, caption in items]


def trained_tasks(train_config: dict | None) -> TrainedTasks:
    """The tasks of a LaVin-DiT run, resolved as ``train/lavin_dit.py`` does: ``data.tasks``, else every task of
    ``data.kinds`` (``genvis.tasks.list_tasks(kind)``).

    Without a training config (an exported pipeline copied elsewhere, a random-init test model), or when none of its
    names is known to this genvis, every built-in image task is listed and the note says so.
    """
    from genvis.tasks import list_tasks

    fallback = list_tasks("image")
    data = train_config.get("data") if isinstance(train_config, dict) else None
    if not isinstance(data, dict):
        return TrainedTasks(
            fallback,
            False,
            "This checkpoint carries no training config, so its trained tasks are unknown: listing every built-in "
            "image task.",
        )
    known = list_tasks()
    tasks, kinds = data.get("tasks"), data.get("kinds")
    if tasks:
        names = [name for name in tasks if name in known]
        source = "`data.tasks`"
    else:
        kinds = [kind for kind in (kinds or []) if kind in ("image", "video")]
        names = [name for kind in kinds for name in list_tasks(kind)]
        source = f"`data.kinds` = {', '.join(kinds) or 'none'}"
    unknown = [name for name in (tasks or []) if name not in known]
    skipped = f" (not in this genvis, left out: {', '.join(map(str, unknown))})" if unknown else ""
    if not names:
        return TrainedTasks(
            fallback,
            False,
            f"The training config names no task this demo knows ({source}{skipped}): listing every built-in image "
            "task.",
        )
    return TrainedTasks(
        names, True, f"Tasks this checkpoint was trained on ({source} of its training config){skipped}."
    )


def sampling_defaults(train_config: dict | None, steps: int = 10) -> SamplingDefaults:
    """The tab's sampling defaults: the run's ``sampling.time_grid`` / ``sampling.num_inference_steps`` and
    ``sampling.guidance_scale`` when its training config has valid ones, else the official ``lavin-20`` grid and the
    pipeline's guidance 1.5. ``steps`` is the uniform grid's default step count (``--steps``)."""
    sampling = train_config.get("sampling") if isinstance(train_config, dict) else None
    sampling = sampling if isinstance(sampling, dict) else {}
    time_grid, sources = DEFAULT_TIME_GRID, []
    run_grid, run_steps = sampling.get("time_grid"), sampling.get("num_inference_steps")
    if run_grid in LAVIN_DIT_TIME_GRIDS:
        time_grid = run_grid
        sources.append("time grid")
    elif run_grid is None and isinstance(run_steps, int) and 1 <= run_steps <= MAX_STEPS:
        time_grid, steps = UNIFORM_GRID, run_steps
        sources.append("uniform steps")
    guidance = sampling.get("guidance_scale")
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and 0.0 <= guidance <= 10.0:
        sources.append("guidance")
    else:
        guidance = DEFAULT_GUIDANCE
    if sources:
        note = f"Sampling defaults from the run's `sampling` config ({', '.join(sources)})"
    else:
        note = "Sampling defaults: the official `lavin-20` grid and the pipeline's guidance"
    return SamplingDefaults(time_grid, steps, float(guidance), f"{note}: `{time_grid}`, guidance {float(guidance):g}.")


def builtin_episode(task: str, num_pairs: float, seed: float, size: int, tasks: Sequence[str] | None = None):
    """A held-out episode of a built-in task (``genvis.tasks``), checked like a user input.

    ``tasks`` limits the choice (the tasks the checkpoint was trained on); None allows every registered task.
    """
    from genvis.tasks import get_task, list_tasks, sample_episode

    names = list(tasks) if tasks is not None else list_tasks()
    if task not in names:
        raise InputError(f"task: expected one of {', '.join(names)}, got {task!r}")
    pairs = check_int(num_pairs, "context pairs", 1, MAX_PAIRS)
    seed = check_int(seed, "seed", 0, 2**31 - 1)
    return sample_episode(get_task(task), pairs, seed=seed, size=size, split="test")


def sampler_arguments(time_grid: str | None, steps: float | None) -> tuple[dict, str]:
    """The pipeline's time-grid arguments for a request -> ``(kwargs, label)``.

    An official grid (``"lavin-20"`` / ``"lavin-30"`` / ``"lavin-40"``) is passed as ``time_grid`` and ``steps`` is
    ignored; :data:`UNIFORM_GRID` passes ``num_inference_steps=steps`` (1..:data:`MAX_STEPS`). Never both: the
    pipeline refuses that.
    """
    time_grid = check_choice(time_grid, "time grid", TIME_GRIDS)
    if time_grid == UNIFORM_GRID:
        steps = check_int(steps, "sampling steps", 1, MAX_STEPS)
        return {"num_inference_steps": steps}, f"uniform grid, {steps} steps"
    return {"time_grid": time_grid}, f"{time_grid} grid, {len(LAVIN_DIT_TIME_GRIDS[time_grid]) - 1} steps"


def run_in_context(
    pipe,
    context_pairs: list[tuple[PIL.Image.Image | torch.Tensor, PIL.Image.Image | torch.Tensor]],
    query: PIL.Image.Image | torch.Tensor,
    time_grid: str | None,
    steps: float | None,
    guidance: float,
    seed: float,
    size: int,
) -> tuple[list[PIL.Image.Image], float, str]:
    """Run the LaVin-DiT pipeline -> (predicted frames, seconds, sampler summary).

    Args:
        pipe: a loaded ``LaVinDiTPipeline``.
        context_pairs: ``[(input, target), ...]`` images (PIL) or clips (``(3, T, H, W)`` in [-1, 1]).
        query: the input to answer.
        time_grid: one of :data:`TIME_GRIDS` (:func:`sampler_arguments`).
        steps: Euler steps, 1..:data:`MAX_STEPS`, for the uniform grid only.
        guidance: CFG weight in [0, 10].
        seed: noise seed.
        size: square output resolution.
    """
    grid_arguments, sampler = sampler_arguments(time_grid, steps)
    guidance = check_number(guidance, "guidance scale", 0.0, 10.0)
    seed = check_int(seed, "seed", 0, 2**31 - 1)
    start = time.perf_counter()
    try:
        output = pipe(
            context_pairs,
            query,
            **grid_arguments,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
        )
    except ValueError as err:  # the pipeline's check_inputs: a mismatch between the request and the model
        raise InputError(f"LaVin-DiT refused the request: {err}") from None
    guidance_text = "no guidance" if guidance == 1.0 else f"guidance {guidance:g}"
    return list(output.frames), time.perf_counter() - start, f"{sampler}, {guidance_text}"


def run_builtin_task(
    pipe,
    task: str,
    num_pairs: float,
    seed: float,
    time_grid: str | None,
    steps: float | None,
    guidance: float,
    size: int,
    tasks: Sequence[str] | None = None,
) -> InContextResult:
    """A built-in task: sample a held-out episode, generate the query's target, show it next to query and answer.

    ``tasks`` are the tasks the request may name (the checkpoint's trained tasks); None allows every built-in one.
    """
    episode = builtin_episode(task, num_pairs, seed, size, tasks)
    frames, seconds, sampler = run_in_context(
        pipe, episode.context_pairs, episode.query, time_grid, steps, guidance, seed, size
    )
    context = []
    for index, (source, target) in enumerate(episode.context_pairs, start=1):
        context += [
            (filmstrip(_clip_frames(source)), f"input {index}"),
            (filmstrip(_clip_frames(target)), f"target {index}"),
        ]
    prediction = filmstrip(frames)
    answer = [
        (filmstrip(_clip_frames(episode.query)), "query"),
        (prediction, "prediction"),
        (filmstrip(_clip_frames(episode.query_target)), "exact answer"),
    ]
    message = f"{task}: {episode.num_pairs} context pair(s), {episode.num_frames} frame(s), {sampler}, {seconds:.1f} s"
    return InContextResult(prediction, labelled_row(answer), _shown(context + answer), message)


def _path_of(upload) -> str:
    """Gradio may hand a path string or an object with ``.path`` / ``.name`` (its file wrappers)."""
    if isinstance(upload, (str, os.PathLike)):
        return os.fspath(upload)
    for attribute in ("path", "name"):
        if hasattr(upload, attribute):
            return str(getattr(upload, attribute))
    return os.fspath(upload)


def _context_caption(index: int) -> str:
    """``input 1, target 1, input 2, ...`` for the 1-based position of an uploaded context image."""
    return f"{'input' if index % 2 else 'target'} {(index + 1) // 2}"


def run_uploaded_task(
    pipe,
    context_files: Sequence | None,
    query_file,
    time_grid: str | None,
    steps: float | None,
    guidance: float,
    seed: float,
    size: int,
    limits: UploadLimits,
    roots: Iterable[str | os.PathLike],
) -> InContextResult:
    """Uploaded context pairs (``input_1, target_1, input_2, ...``) and a query image -> the query's target.

    The uploads are shown as the model sees them (centre-cropped and resized to ``size``), upscaled and labelled.
    """
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
    frames, seconds, sampler = run_in_context(pipe, pairs, query, time_grid, steps, guidance, seed, size)
    prediction = filmstrip(frames)
    context = [(image, _context_caption(index)) for index, image in enumerate(images, 1)]
    answer = [(query, "query"), (prediction, "prediction")]
    message = f"uploaded task: {len(pairs)} context pair(s), {sampler}, {seconds:.1f} s"
    return InContextResult(prediction, labelled_row(answer), _shown(context + answer), message)


def preview_uploads(
    context_files: Sequence | None,
    query_file,
    size: int,
    limits: UploadLimits,
    roots: Iterable[str | os.PathLike],
) -> tuple[list[tuple[PIL.Image.Image, str]], str]:
    """The uploads as the model will see them, before running -> ``(gallery items, one-line summary)``.

    Each file goes through the same checks as :func:`run_uploaded_task`; a refused file is left out and its message
    is put in the summary instead of raising, so the preview never stands in for the run's own error.
    """
    roots = list(roots)
    items, problems = [], []
    named = [
        (file, _context_caption(index), f"context image {index}") for index, file in enumerate(context_files or [], 1)
    ]
    if query_file is not None:
        named.append((query_file, "query", "query image"))
    for file, caption, what in named:
        try:
            items.append((upscale(fit_square(load_image(_path_of(file), what, limits, roots), size)), caption))
        except InputError as err:
            problems.append(str(err))
    count = len(context_files or [])
    parts = [f"{count // 2} context pair(s)" + (" and an input without its target" if count % 2 else "")]
    parts.append("a query" if query_file is not None else "no query yet")
    summary = f"preview: {', '.join(parts)}, shown at {size} px as the model sees them"
    if count > 2 * MAX_PAIRS:
        problems.append(f"context pairs: expected at most {MAX_PAIRS} pairs ({2 * MAX_PAIRS} images), got {count}")
    return items, summary + ("" if not problems else "; refused: " + "; ".join(problems))


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


MAX_QUESTION_CHARS = 300
MAX_NEW_TOKENS = 64


def run_chat(
    model,
    image_file,
    question: str | None,
    limits: UploadLimits,
    roots: Iterable[str | os.PathLike],
    max_new_tokens: float = 16,
    image_size: int | None = None,
) -> str:
    """Ask a loaded ``VisionLanguageModel`` about an uploaded image -> its greedy answer.

    Args:
        model: the MLLM (vision tower + causal LM).
        image_file: the uploaded image.
        question: the question; an ``<image>`` marker is put in front unless the text has one.
        limits: upload limits.
        roots: folders uploads may come from.
        max_new_tokens: answer length cap, 1..:data:`MAX_NEW_TOKENS`.
        image_size: square side the image is fitted to (the training resolution); None keeps the upload's size.
    """
    from genvis.models.vision_tower import VisionLanguageProcessor

    if image_file is None:
        raise InputError("image: expected an uploaded image, got nothing")
    question = check_text(question, "question", MAX_QUESTION_CHARS)
    max_new_tokens = check_int(max_new_tokens, "answer tokens", 1, MAX_NEW_TOKENS)
    image = load_image(_path_of(image_file), "image", limits, roots)
    if image_size is not None:
        image = fit_square(image, image_size)
    processor = VisionLanguageProcessor.from_model(model)
    prompt = question if processor.image_marker in question else processor.image_marker + question + " "
    if prompt.count(processor.image_marker) != 1:
        raise InputError(
            f"question: expected at most one {processor.image_marker} marker, got {prompt.count(processor.image_marker)}"
        )
    array = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) uint8
    try:
        batch = processor([prompt], images=[array])
    except ValueError as err:
        raise InputError(f"the MLLM processor refused the image: {err}") from None
    new_tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
    return answer or "(the model answered with an empty string)"


def inspect_encoder(encoder, image: PIL.Image.Image, size: int) -> tuple[PIL.Image.Image, PIL.Image.Image, str]:
    """Patch-feature PCA (first 3 components as RGB) and patch-norm map of one encoder on one image.

    High-norm patch tokens are the artifacts that registers remove (Darcet et al., arXiv 2309.16588), so the norm
    map of an encoder with registers should be flat where the one without shows isolated bright patches.

    Args:
        encoder: a ``genvis.encoders.VisionTransformerModel``.
        image: RGB image, fitted to ``size x size``.
        size: input side in pixels (a multiple of the encoder's patch size).
    Returns:
        ``(pca image, norm image, summary)``, both images upsampled to ``size`` with nearest-neighbour.
    """
    patch = int(encoder.config.patch_size)
    merge = int(getattr(encoder.config, "spatial_merge_size", 1) or 1)
    if size % (patch * merge):
        raise InputError(f"size: expected a multiple of {patch * merge} (patch x merge), got {size}")
    pixels = torch.from_numpy(np.asarray(fit_square(image, size), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    with torch.no_grad():
        output = encoder.forward_features(pixels[None].to(encoder.device, encoder.dtype), intermediate_layers=1)
    # the last block's patch tokens before the final norm: a LayerNorm would equalise every token's norm
    raster = encoder.patch_grids(output, output.intermediates[-1])[0][
        0
    ].float()  # (t, h, w, D) of the one item -> first frame (h, w, D)
    grid_h, grid_w = raster.shape[:2]
    features = raster.reshape(grid_h * grid_w, -1)  # (h*w, D)
    centred = features - features.mean(0, keepdim=True)
    _, _, basis = torch.linalg.svd(centred, full_matrices=False)
    components = centred @ basis[:3].T  # (h*w, 3)
    low, high = components.min(0).values, components.max(0).values
    rgb = ((components - low) / (high - low).clamp_min(1e-6)).reshape(grid_h, grid_w, 3)
    norms = features.norm(dim=-1).reshape(grid_h, grid_w)
    unit = (norms - norms.min()) / (norms.max() - norms.min()).clamp_min(1e-6)

    def upsample(array: np.ndarray) -> PIL.Image.Image:
        return PIL.Image.fromarray((array * 255).round().astype(np.uint8)).resize(
            (size, size), PIL.Image.Resampling.NEAREST
        )

    registers = int(getattr(encoder.config, "num_register_tokens", 0) or 0)
    ratio = float(norms.max() / norms.median().clamp_min(1e-6))
    summary = f"{registers} register(s), {grid_h}x{grid_w} patches, max/median patch norm {ratio:.2f}"
    return upsample(rgb.numpy()), upsample(unit.numpy()), summary


def run_encoder_inspection(
    encoders: Sequence[tuple[str, object]],
    image_file,
    size: float,
    limits: UploadLimits,
    roots: Iterable[str | os.PathLike],
) -> tuple[list[tuple[PIL.Image.Image, str]], str]:
    """:func:`inspect_encoder` for every ``(label, encoder)`` on one uploaded image -> (gallery items, summary)."""
    if image_file is None:
        raise InputError("image: expected an uploaded image, got nothing")
    size = check_int(size, "input size", 32, 512)
    image = load_image(_path_of(image_file), "image", limits, roots)
    items, lines = [], []
    for label, encoder in encoders:
        pca, norms, summary = inspect_encoder(encoder, image, size)
        items += [(pca, f"{label}: PCA"), (norms, f"{label}: patch norms")]
        lines.append(f"- **{label}**: {summary}")
    return items, "\n".join(lines)
