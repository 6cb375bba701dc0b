"""Single source of truth for the OpenVid-1M CSV columns and the webdataset shard layout.

The shard builder (``data_pipelines``) writes with these names and the loaders (``genvis.data.loaders``) read with them.
OpenVid-1M's CSV header (HF ``nkp37/OpenVid-1M``, ``data/train/OpenVid-1M.csv``) uses column names with spaces;
``CSV_COLUMNS`` keeps that exact spelling and accepts a few tolerant aliases (snake_case, ``num_frames``, ...).
Checked by ``tests/data/test_schema_builtin.py``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

SCHEMA_VERSION = 1

# webdataset member extensions of one sample: ``{key}.mp4`` (or the video's real container, see VIDEO_EXTS),
# ``{key}.txt``, ``{key}.json``.
KEY_FIELD = "__key__"
VIDEO_EXT = "mp4"
CAPTION_EXT = "txt"
METADATA_EXT = "json"
SHARD_EXTS: tuple[str, ...] = (VIDEO_EXT, CAPTION_EXT, METADATA_EXT)
# The video member is named after its container format (``genvis.data.video.container_extension``): webm bytes are
# stored as ``{key}.webm``, never as ``.mp4``. ``video`` is used for a container the sniffer does not know.
VIDEO_EXTS: tuple[str, ...] = ("mp4", "mov", "webm", "mkv", "avi", "ts", "mpg", "ogv", "flv", "wmv", "video")

# Output file names inside a shard directory.
SHARD_PATTERN = "{shard:06d}.tar"
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.csv"
JOURNAL_NAME = ".build_journal.jsonl"


@dataclass(frozen=True)
class CsvColumn:
    """One OpenVid-1M CSV column.

    Args:
        header: exact OpenVid-1M header spelling.
        field: snake_case name used in the shard ``json`` metadata.
        kind: value type the cell must parse as.
        required: a CSV without this column cannot be used at all.
        aliases: other header spellings accepted (compared after lower-casing and mapping ``_``/``-`` to spaces).
    """

    header: str
    field: str
    kind: Literal["str", "float", "int"]
    required: bool = False
    aliases: tuple[str, ...] = ()


CSV_COLUMNS: tuple[CsvColumn, ...] = (
    CsvColumn(
        "video", "video", "str", required=True, aliases=("path", "video path", "file", "filename", "video name")
    ),
    CsvColumn("caption", "caption", "str", required=True, aliases=("text", "prompt")),
    CsvColumn("aesthetic score", "aesthetic_score", "float", aliases=("aes", "aesthetic")),
    CsvColumn("motion score", "motion_score", "float", aliases=("motion", "flow", "flow score")),
    CsvColumn("temporal consistency score", "temporal_consistency_score", "float", aliases=("temporal consistency",)),
    CsvColumn("camera motion", "camera_motion", "str", aliases=("camera",)),
    CsvColumn("frame", "frame", "int", aliases=("frames", "num frames", "num_frames", "length")),
    CsvColumn("fps", "fps", "float", aliases=("frame rate",)),
    CsvColumn("seconds", "seconds", "float", aliases=("duration", "duration seconds")),
)
OPENVID_HEADER: tuple[str, ...] = tuple(column.header for column in CSV_COLUMNS)
CSV_FIELDS: tuple[str, ...] = tuple(column.field for column in CSV_COLUMNS)

# Columns of the zip-based layout (community mapping ``phil329/OpenVid-1M-mapping``: zip_file, video, video_path).
ZIP_COLUMN = CsvColumn("zip_file", "zip_file", "str", aliases=("zip", "zip file", "archive"))
INNER_PATH_COLUMN = CsvColumn("video_path", "video_path", "str", aliases=("inner path", "member", "video path in zip"))

# Fields the builder adds to every sample's json after probing the video with decord.
PROBE_FIELDS: tuple[str, ...] = ("width", "height", "probed_frames", "probed_fps", "probed_seconds")
# Bookkeeping fields in every sample's json: CSV line number and schema version.
SOURCE_FIELDS: tuple[str, ...] = ("csv_line", "schema_version")
METADATA_FIELDS: tuple[str, ...] = CSV_FIELDS + PROBE_FIELDS + SOURCE_FIELDS


def normalize_header(name: str) -> str:
    """Lower-case a header and map ``_``/``-``/repeated whitespace to one space (``Motion_Score`` -> ``motion score``)."""
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower())).strip()


def resolve_columns(header: list[str], columns: tuple[CsvColumn, ...]) -> dict[str, int]:
    """Map each known column's ``field`` to its index in ``header`` (exact spelling first, then aliases).

    Columns absent from the header are left out of the result; callers decide which are required.
    """
    normalized = [normalize_header(name) for name in header]
    positions: dict[str, int] = {}
    for column in columns:
        for candidate in (column.header, column.field, *column.aliases):
            target = normalize_header(candidate)
            if target in normalized:
                positions[column.field] = normalized.index(target)
                break
    return positions


_KEY_UNSAFE = re.compile(r"[^\w\-]+")
# USTAR tar names hold 100 bytes; a key leaves room for ".json" / ".webm" and a "_L<line>" de-duplication suffix.
KEY_MAX_BYTES = 80


def sample_key(video_name: str) -> str:
    """webdataset ``__key__`` for a video file name: the NFC stem with every run of characters other than letters,
    digits, ``_`` and ``-`` (in any script) as ``_``.

    webdataset splits a tar member name at the first ``.`` of its basename into key and extension, so keys must not
    contain dots (or ``/``); ``abc_0.5to3.2.mp4`` becomes ``abc_0_5to3_2`` and ``東京の夜.mp4`` stays ``東京の夜``.
    A stem with no letter or digit, or longer than ``KEY_MAX_BYTES`` in UTF-8, gets a hash of the full name, so two
    such names never share a key. The original name stays in ``json["video"]``.
    """
    base = unicodedata.normalize("NFC", video_name.replace("\\", "/").rsplit("/", 1)[-1])
    stem = base.rsplit(".", 1)[0] if "." in base else base
    key = _KEY_UNSAFE.sub("_", stem).strip("_")
    digest = hashlib.sha1(video_name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    if not key.replace("_", "").replace("-", ""):
        return f"sample_{digest}"
    if len(key.encode("utf-8")) > KEY_MAX_BYTES:
        head = key.encode("utf-8")[: KEY_MAX_BYTES - 13].decode("utf-8", "ignore")
        return f"{head}_{digest}"
    return key
