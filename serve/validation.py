"""Input checks for the demo: uploads (size, type, pixels, allowed paths) and numeric / text fields.

Every check raises :class:`InputError` with a message meant for the person using the demo: it names the field, what
was expected and what was got. The Gradio wiring (``serve/app.py``) shows that message in the UI and logs it, so a bad
upload never reaches a model and never takes the server down (specs/perf_reliability_ecosystem.md §B6, §B7 item 7).
Tested in tests/serve/test_handlers.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "InputError",
    "UploadLimits",
    "check_allowed_path",
    "check_choice",
    "check_int",
    "check_number",
    "check_text",
    "load_image",
    "pair_up",
]

# PIL format names accepted for uploads; anything else (TIFF, PSD, ICO, EPS, ...) is refused before decoding.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class InputError(ValueError):
    """A user input the demo refuses; the message is shown as is in the UI."""


@dataclass(frozen=True)
class UploadLimits:
    """Upload limits applied before any decoding.

    Args:
        max_bytes: largest accepted file (Gradio's ``max_file_size`` is set to the same value).
        max_pixels: largest accepted ``width * height``, read from the header before decoding (a decompression bomb
            is refused without allocating it).
        max_side: largest accepted width or height.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UploadLimits.{name}: expected a positive int, got {value!r}")


def _human_bytes(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if count < 1024 or unit == "MiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _pixel_limit(limits: UploadLimits) -> str:
    return f"the limit is {limits.max_pixels / 1e6:.1f} MP and {limits.max_side} px per side"


def check_allowed_path(path: str | os.PathLike, roots: Iterable[str | os.PathLike], what: str) -> Path:
    """Resolve ``path`` (symlinks included) and require a regular file inside one of ``roots``.

    Gradio hands handlers paths of files it stored in its upload cache; a path anywhere else (``../`` in a name, a
    symlink, an API call naming ``/etc/passwd``) is refused before it is opened.
    """
    resolved = Path(path).resolve()
    allowed = [Path(root).resolve() for root in roots]
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise InputError(f"{what}: the file {Path(path).name!r} is outside the upload folder; upload it again")
    if not resolved.is_file():
        raise InputError(f"{what}: {Path(path).name!r} is not a file (got a folder or nothing)")
    return resolved


def load_image(
    path: str | os.PathLike,
    what: str,
    limits: UploadLimits,
    roots: Iterable[str | os.PathLike],
) -> PIL.Image.Image:
    """Check and decode one uploaded image -> an RGB PIL image (first frame of an animated GIF).

    Args:
        path: the uploaded file.
        what: the field's name in messages (e.g. ``"query image"``).
        limits: byte / pixel limits.
        roots: folders uploads may come from.

    Raises:
        InputError: empty, too large, not an image, a format outside :data:`ALLOWED_IMAGE_FORMATS`, too many pixels,
            or truncated / corrupt data.
    """
    resolved = check_allowed_path(path, roots, what)
    name = Path(path).name
    size = resolved.stat().st_size
    if size == 0:
        raise InputError(f"{what}: {name!r} is empty (0 bytes); expected an image file")
    if size > limits.max_bytes:
        raise InputError(
            f"{what}: {name!r} is {_human_bytes(size)}; the limit is {_human_bytes(limits.max_bytes)} per file"
        )
    try:
        image = PIL.Image.open(resolved, formats=ALLOWED_IMAGE_FORMATS)  # reads the header only
    except PIL.Image.UnidentifiedImageError:
        with open(resolved, "rb") as handle:
            head = handle.read(8)
        raise InputError(
            f"{what}: {name!r} is not an image in an accepted format (expected {', '.join(ALLOWED_IMAGE_FORMATS)}; "
            f"the file starts with {head!r})"
        ) from None
    except PIL.Image.DecompressionBombError as err:  # PIL refuses > 2 * MAX_IMAGE_PIXELS already at open
        found = re.search(r"\((\d+) pixels\)", str(err))
        size_text = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "too large"
        raise InputError(f"{what}: {name!r} is {size_text}; {_pixel_limit(limits)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{what}: {name!r} could not be read as an image ({err})") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1 or max(width, height) > limits.max_side or width * height > limits.max_pixels:
            raise InputError(
                f"{what}: {name!r} is {width}x{height} = {width * height / 1e6:.1f} MP; {_pixel_limit(limits)}"
            )
        try:
            image.seek(0)
            rgb = image.convert("RGB")  # decodes; truncated / corrupt data fails here
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
            raise InputError(
                f"{what}: {name!r} ({image.format}, {width}x{height}) is truncated or corrupt ({err})"
            ) from None
    return rgb


def check_int(value: float | int | None, what: str, low: int, high: int) -> int:
    """An integral number in ``[low, high]`` (Gradio sliders and number boxes send floats) -> int."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InputError(f"{what}: expected a whole number in [{low}, {high}], got {value!r}")
    if not low <= int(value) <= high:
        raise InputError(f"{what}: expected a whole number in [{low}, {high}], got {int(value)}")
    return int(value)


def check_number(value: float | int | None, what: str, low: float, high: float) -> float:
    """A finite number in ``[low, high]`` -> float."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(f"{what}: expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_choice(value: str | None, what: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (a dropdown's value; API callers can send anything) -> the value."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{what}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def check_text(value: str | None, what: str, max_chars: int) -> str:
    """Non-empty text of at most ``max_chars`` characters (stripped)."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what}: expected some text, got an empty field")
    text = value.strip()
    if len(text) > max_chars:
        raise InputError(f"{what}: expected at most {max_chars} characters, got {len(text)}")
    return text


def pair_up(
    images: Sequence[PIL.Image.Image], what: str, max_pairs: int
) -> list[tuple[PIL.Image.Image, PIL.Image.Image]]:
    """``[in_1, tgt_1, in_2, tgt_2, ...]`` -> ``[(in_1, tgt_1), ...]``; needs an even count of at most ``2 * max_pairs``."""
    if len(images) % 2:
        raise InputError(
            f"{what}: expected an even number of images (input, target, input, target, ...), got {len(images)}"
        )
    if len(images) > 2 * max_pairs:
        raise InputError(f"{what}: expected at most {max_pairs} pairs ({2 * max_pairs} images), got {len(images)}")
    return [(images[i], images[i + 1]) for i in range(0, len(images), 2)]
