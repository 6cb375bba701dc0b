"""Caption following for MVDiT, read back from the pixels with the procedural generator's own rules.

The built-in captions are exact (``genvis.data.builtin.procedural_video``): one shape of a named colour
(``SHAPE_COLORS``) and kind (``SHAPE_KINDS``) moves along one axis (``MOTIONS``) over a textured background of a named
colour (``BACKGROUND_COLORS``). So a generated clip can be scored without any learned model:

- background colour: every pixel is labelled with its nearest colour of the joint palette (shape and background
  colours are disjoint); the background is the background colour with the most pixels over all frames (the texture
  shades the base colour by about +-25 %, which stays nearest to its own name);
- shape colour: the shape colour with the most pixels (a blurry shape keeps a core nearest to its colour);
- shape kind: per frame, the mask of the shape colour is compared (IoU) with the generator's own masks
  (``_shape_mask``) of each kind at the mask's centre and at the radius its area implies; the kind with the highest
  IoU summed over frames wins;
- motion: the least-squares slope of the mask centroid over the frames; the axis with the larger travel and its sign.

``read_clip_attributes`` returns a ``VideoAttributes`` (None where nothing was found, e.g. no shape pixels);
``parse_caption`` reads the same fields from a caption; ``caption_following_report`` scores (caption, clip) pairs per
attribute and for all four at once, next to chance (uniform over the options) and a shuffled-caption baseline (each
clip against the other clips' captions).
Checked by tests/mvdit/test_mvdit_evaluation.py: 100 % on the generator's own clips (also blurred and through mp4),
near chance on noise and on shuffled captions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from genvis.data.builtin import (
    ATTRIBUTE_OPTIONS,
    BACKGROUND_COLORS,
    MOTIONS,
    SHAPE_COLORS,
    SHAPE_KINDS,
    VideoAttributes,
    _shape_mask,
)

__all__ = [
    "ATTRIBUTES",
    "caption_following_report",
    "clip_to_uint8",
    "labelled_clip_grid",
    "parse_caption",
    "read_clip_attributes",
]

ATTRIBUTES: tuple[str, ...] = VideoAttributes._fields
_PALETTE_NAMES = tuple(SHAPE_COLORS) + tuple(BACKGROUND_COLORS)
_PALETTE = np.asarray([*SHAPE_COLORS.values(), *BACKGROUND_COLORS.values()], dtype=np.float32)  # (11, 3)
_NUM_SHAPE_COLORS = len(SHAPE_COLORS)
_AREA_PER_RADIUS2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # mask area / radius^2 of each kind
_BLUR_SIGMAS = (0.0, 0.75, 1.5, 2.25)  # blur widths (pixels) the kind templates are tried at
_MIN_SHAPE_PIXELS = 3  # per frame, fewer shape-colour pixels = no shape in that frame


def clip_to_uint8(clip: torch.Tensor | np.ndarray) -> np.ndarray:
    """A clip as ``(T, H, W, 3)`` uint8.

    Accepts ``(T, H, W, 3)`` or ``(T, 3, H, W)`` arrays / tensors, uint8 (0-255) or float in [-1, 1] (the models'
    range; the pipelines' ``output_type="pt"/"np"`` frames in [0, 1] must be mapped with ``2 x - 1`` first).
    """
    array = clip.detach().float().cpu().numpy() if torch.is_tensor(clip) else np.asarray(clip)
    if array.ndim != 4 or 3 not in (array.shape[1], array.shape[-1]):
        raise ValueError(f"clip: expected (T, H, W, 3) or (T, 3, H, W), got {tuple(array.shape)}")
    if array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    return ((np.clip(array, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """``(size, size)`` matrix of a 1D Gaussian blur with replicated edges."""
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((size, size))
    for row in range(size):
        for offset, weight in zip(range(-radius, radius + 1), kernel, strict=True):
            matrix[row, min(max(row + offset, 0), size - 1)] += weight
    return matrix


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-replicated) of a 2D array."""
    if sigma <= 0:
        return image
    return _blur_matrix(image.shape[0], sigma) @ image @ _blur_matrix(image.shape[1], sigma).T


def _kind_errors(alpha: np.ndarray) -> np.ndarray:
    """Per kind, the smallest mean squared error between one frame's shape map ``alpha`` (0 background, 1 shape) and
    that kind's generator mask at the map's centroid and at the radius its area implies, blurred by each of a few
    widths (a model's output is blurry, and blur rounds a small square's corners)."""
    height, width = alpha.shape
    weights = alpha.sum()
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = float((xs * alpha).sum() / weights), float((ys * alpha).sum() / weights)
    errors = np.zeros(len(SHAPE_KINDS))
    for index, kind in enumerate(SHAPE_KINDS):
        radius = max(np.sqrt(weights / _AREA_PER_RADIUS2[kind]), 0.5)
        # a triangle's centroid lies r/3 below the centre of its bounding box (apex at cy - r, base at cy + r)
        center = (cx, cy - radius / 3.0) if kind == "triangle" else (cx, cy)
        template = _shape_mask(kind, center, radius, height, width).astype(np.float64)
        errors[index] = min(float(((_blur(template, sigma) - alpha) ** 2).mean()) for sigma in _BLUR_SIGMAS)
    return errors / max(weights / alpha.size, 1e-9)


def read_clip_attributes(clip: torch.Tensor | np.ndarray) -> VideoAttributes:
    """Background colour, shape colour, shape kind and motion of a one-shape clip (see the module docstring)."""
    frames = clip_to_uint8(clip)
    pixels = frames.astype(np.float32)
    distances = ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1)  # (T, H, W, 11)
    labels = distances.argmin(-1)
    counts = np.bincount(labels.ravel(), minlength=len(_PALETTE_NAMES))
    background_counts = counts[_NUM_SHAPE_COLORS:]
    if not background_counts.any():
        return VideoAttributes(None, None, None, None)
    background_index = _NUM_SHAPE_COLORS + int(background_counts.argmax())
    background = _PALETTE_NAMES[background_index]
    # shape colour: votes of the shape-coloured pixels, each weighted by how much nearer it is to its shape colour
    # than to the background colour (blurred rims, mixtures of shape and background, count little)
    margin = np.sqrt(distances[..., background_index]) - np.sqrt(distances.min(-1))
    votes = np.bincount(labels.ravel(), weights=margin.ravel(), minlength=len(_PALETTE_NAMES))[:_NUM_SHAPE_COLORS]
    if not (votes > 0).any():
        return VideoAttributes(background, None, None, None)
    color_index = int(votes.argmax())
    # shape mask: the pixel is more than half-way from the frame's background colour to the shape colour (a blurred
    # edge crosses half-way where the sharp edge was)
    shape_rgb = _PALETTE[color_index]
    masks = np.zeros(labels.shape, dtype=bool)
    alphas = np.zeros(labels.shape, dtype=np.float64)
    for t in range(len(frames)):
        own = labels[t] == background_index
        base = np.median(pixels[t][own], axis=0) if own.any() else _PALETTE[background_index]
        direction = shape_rgb - base
        alpha = ((pixels[t] - base) @ direction) / max(float(direction @ direction), 1e-6)
        alphas[t] = np.clip(alpha, 0.0, 1.0)
        masks[t] = (alpha > 0.5) & (labels[t] < _NUM_SHAPE_COLORS)
    present = [t for t in range(len(masks)) if masks[t].sum() >= _MIN_SHAPE_PIXELS]
    if not present:
        return VideoAttributes(background, _PALETTE_NAMES[color_index], None, None)
    # the kind from the shape map near the mask (background texture far from the shape would bias the fit)
    near = [_blur(masks[t].astype(np.float64), 1.0) > 1e-3 for t in present]
    kind_errors = sum(_kind_errors(np.where(keep, alphas[t], 0.0)) for keep, t in zip(near, present, strict=True))
    kind = SHAPE_KINDS[int(np.argmin(kind_errors))]
    motion = None
    if len(present) >= 2:
        times = np.asarray(present, dtype=np.float64)
        centroids = np.asarray([np.argwhere(masks[t]).mean(0) for t in present])  # (n, 2) as (y, x)
        slope_y, slope_x = np.polyfit(times - times.mean(), centroids, 1)[0]
        dx, dy = (int(np.sign(slope_x)), 0) if abs(slope_x) >= abs(slope_y) else (0, int(np.sign(slope_y)))
        motion = next((name for name, vector in MOTIONS if vector == (dx, dy)), None)
    return VideoAttributes(background, _PALETTE_NAMES[color_index], kind, motion)


_SHAPE_PATTERN = re.compile(
    r"\ban? (?P<color>{colors}) (?P<kind>{kinds}) moves (?P<motion>{motions})\b".format(
        colors="|".join(SHAPE_COLORS), kinds="|".join(SHAPE_KINDS), motions="|".join(name for name, _ in MOTIONS)
    )
)
_BACKGROUND_PATTERN = re.compile(r"\bover an? (?P<background>{}) background\b".format("|".join(BACKGROUND_COLORS)))


def parse_caption(caption: str) -> VideoAttributes:
    """The attributes a procedural caption states (its first shape for two-shape captions; None where absent)."""
    shape = _SHAPE_PATTERN.search(caption)
    background = _BACKGROUND_PATTERN.search(caption)
    return VideoAttributes(
        background["background"] if background else None,
        shape["color"] if shape else None,
        shape["kind"] if shape else None,
        shape["motion"] if shape else None,
    )


def _accuracies(stated: list[VideoAttributes], read: list[VideoAttributes]) -> dict[str, float]:
    hits = np.asarray([[s[i] == r[i] for i in range(len(ATTRIBUTES))] for s, r in zip(stated, read, strict=True)])
    scores = {name: float(hits[:, i].mean()) for i, name in enumerate(ATTRIBUTES)}
    scores["all"] = float(hits.all(axis=1).mean())
    return scores


def _shuffled_accuracies(stated: list[VideoAttributes], read: list[VideoAttributes]) -> dict[str, float]:
    """Accuracy of every clip against every *other* clip's caption, averaged (the expectation over random pairings)."""
    n = len(stated)
    if n < 2:
        return {name: float("nan") for name in (*ATTRIBUTES, "all")}
    hits = np.asarray([[[s[a] == r[a] for a in range(len(ATTRIBUTES))] for s in stated] for r in read])  # (n, n, 4)
    off_diagonal = ~np.eye(n, dtype=bool)
    scores = {name: float(hits[..., a][off_diagonal].mean()) for a, name in enumerate(ATTRIBUTES)}
    scores["all"] = float(hits.all(axis=-1)[off_diagonal].mean())
    return scores


def caption_following_report(
    captions: Sequence[str],
    clips: Sequence[torch.Tensor | np.ndarray],
    options: dict[str, Sequence[str]] | None = None,
) -> dict[str, object]:
    """Score how well each clip shows its caption.

    Args:
        captions: one procedural caption per clip (every attribute must parse).
        clips: the clips (any layout ``clip_to_uint8`` accepts).
        options: the values each attribute was drawn from (default: the generator's whole vocabulary); sets the
            chance level ``1 / len(options[name])`` (all four: the product).

    Returns:
        ``{"n", "accuracy": {background, color, kind, motion, all}, "chance": {...}, "shuffled": {...}, "per_clip"}``:
        ``shuffled`` scores every clip against every other clip's caption, averaged (the baseline of a model that
        ignores its caption but draws from the caption distribution); ``per_clip`` lists stated / read attributes.
    """
    if len(captions) != len(clips):
        raise ValueError(f"clips: expected one per caption ({len(captions)}), got {len(clips)}")
    if not captions:
        raise ValueError("captions: expected at least one (caption, clip) pair, got none")
    stated = [parse_caption(caption) for caption in captions]
    for caption, attributes in zip(captions, stated, strict=True):
        if None in attributes:
            missing = [name for name, value in zip(ATTRIBUTES, attributes, strict=True) if value is None]
            raise ValueError(f"captions: {caption!r} does not state {missing} in the procedural caption form")
    options = {**ATTRIBUTE_OPTIONS, **(options or {})}
    read = [read_clip_attributes(clip) for clip in clips]
    chance = {name: 1.0 / len(options[name]) for name in ATTRIBUTES}
    chance["all"] = float(np.prod([chance[name] for name in ATTRIBUTES]))
    return {
        "n": len(captions),
        "accuracy": _accuracies(stated, read),
        "chance": chance,
        "shuffled": _shuffled_accuracies(stated, read),
        "per_clip": [
            {"caption": caption, "stated": s._asdict(), "read": r._asdict()}
            for caption, s, r in zip(captions, stated, read, strict=True)
        ],
    }


def labelled_clip_grid(
    clips: Sequence[torch.Tensor | np.ndarray], labels: Sequence[str], frames: int = 5, scale: int | None = None
) -> Image.Image:
    """One row per clip: its label (e.g. the caption) above ``frames`` evenly spaced frames, upscaled ``scale`` x
    (nearest; default: to about 96 px), so a person reads at a glance whether each clip shows its caption."""
    if len(clips) != len(labels) or not clips:
        raise ValueError(f"labels: expected one per clip ({len(clips)}), got {len(labels)}")
    arrays = [clip_to_uint8(clip) for clip in clips]
    scale = scale if scale is not None else max(1, int(np.ceil(96 / arrays[0].shape[1])))
    height, width = arrays[0].shape[1] * scale, arrays[0].shape[2] * scale
    pad, text_height = 4, 14
    columns = min(frames, min(len(a) for a in arrays))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(label)) for label in labels) + 2 * pad
    canvas_width = max(pad + columns * (width + pad), text_width)
    canvas = Image.new("RGB", (canvas_width, len(arrays) * (text_height + height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (array, label) in enumerate(zip(arrays, labels, strict=True)):
        top = pad + row * (text_height + height + pad)
        draw.text((pad, top), label, fill=(0, 0, 0))
        for column, index in enumerate(np.linspace(0, len(array) - 1, columns).round().astype(int)):
            frame = Image.fromarray(array[index]).resize((width, height), Image.Resampling.NEAREST)
            canvas.paste(frame, (pad + column * (width + pad), top + text_height))
    return canvas
