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
    "MAX_NEW_TOKENS",
    "MAX_PAIRS",
    "MAX_STEPS",
    "InContextResult",
    "TextToVideoResult",
    "builtin_episode",
    "filmstrip",
    "fit_square",
    "inspect_encoder",
    "run_builtin_task",
    "run_chat",
    "run_encoder_inspection",
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
