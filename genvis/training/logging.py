"""Sample logging: image grids written as PNG under the run dir and sent to the accelerate trackers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont

__all__ = ["log_image", "log_image_grid", "make_grid", "to_pil"]


def to_pil(image: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """``(3, H, W)`` / ``(H, W, 3)`` tensor or array in [-1, 1] (float) or uint8 -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().float().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8:
        array = ((np.clip(array, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array, "RGB")


def make_grid(
    rows: list[list],
    pad: int = 2,
    *,
    scale: int = 1,
    column_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
) -> Image.Image:
    """Lay out rows of images (any mix accepted by :func:`to_pil`) on a white canvas; ragged rows are allowed.

    Args:
        rows: images per row.
        pad: pixels between cells.
        scale: nearest-neighbour upscaling of every cell (tiny 32 px samples are unreadable at 1x).
        column_labels: a header line of text above the columns.
        row_labels: text left of each row (e.g. the task name).
    """
    pil_rows = [[to_pil(im) for im in row] for row in rows if row]
    if not pil_rows:
        raise ValueError("make_grid needs at least one image")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        pil_rows = [
            [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in row] for row in pil_rows
        ]
    if row_labels is not None and len(row_labels) != len(pil_rows):
        raise ValueError(f"got {len(row_labels)} row labels for {len(pil_rows)} rows")
    font = ImageFont.load_default()
    cell_w = max(im.width for row in pil_rows for im in row)
    cell_h = max(im.height for row in pil_rows for im in row)
    cols = max(len(row) for row in pil_rows)
    text_h = 14
    left = 0 if row_labels is None else pad + max(int(font.getlength(label)) for label in row_labels) + pad
    top = 0 if column_labels is None else text_h + pad
    canvas = Image.new(
        "RGB", (left + cols * (cell_w + pad) + pad, top + len(pil_rows) * (cell_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels or []):
        draw.text((left + pad + c * (cell_w + pad), pad), label, fill="black", font=font)
    for r, row in enumerate(pil_rows):
        y = top + pad + r * (cell_h + pad)
        if row_labels is not None:
            draw.text((pad, y + cell_h // 2 - text_h // 2), row_labels[r], fill="black", font=font)
        for c, im in enumerate(row):
            canvas.paste(im, (left + pad + c * (cell_w + pad), y))
    return canvas


def log_image_grid(
    accelerator: Accelerator,
    tag: str,
    rows: list[list],
    step: int,
    output_dir: str | os.PathLike,
    **grid_options,
) -> Path | None:
    """Write ``<output_dir>/samples/<tag>-<step>.png`` and log it to the trackers (main process only).

    ``grid_options`` go to :func:`make_grid` (``scale``, ``column_labels``, ``row_labels``).
    """
    if not accelerator.is_main_process:
        return None
    return log_image(accelerator, tag, make_grid(rows, **grid_options), step, output_dir)


def log_image(
    accelerator: Accelerator, tag: str, image: Image.Image, step: int, output_dir: str | os.PathLike
) -> Path | None:
    """Write a ready image (e.g. a labelled grid) to ``<output_dir>/samples/<tag>-<step>.png`` + TensorBoard."""
    if not accelerator.is_main_process:
        return None
    path = Path(output_dir) / "samples" / f"{tag}-{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(image)}, step=step, dataformats="HWC")
    return path
