"""Build webdataset shards from an OpenVid-1M style CSV and a video folder (or zip archives), resumably.

Stages, in CSV order:
1. **CSV**: parse every row; a row with a wrong field count, an empty required cell or a bad number is rejected with
   its line number, column, expected type and the value found. Score filters (aesthetic, motion, temporal
   consistency, camera motion) run here, before any decoding.
2. **File**: find the video in the flat folder (``video`` column) or in a zip archive (``zip_file`` + ``video_path``
   columns, or ``--video-root`` pointing at a zip); a missing file is rejected.
3. **Probe**: decord, torchcodec or PyAV (``--decoder``; ``auto`` takes the first installed, logged in one line)
   decodes each video in a worker subprocess with a timeout (``data_pipelines.probe``); corrupt,
   truncated, empty, non-video, hanging or crashing files are rejected. Duration, fps, frame-count and resolution
   filters run on the probed values.
4. **Write**: accepted samples go, in CSV order, into ``{shard:06d}.tar`` (``__key__``, ``mp4``, ``txt``, ``json``) via
   ``webdataset.TarWriter``; each shard is written as ``.tmp``, renamed when complete and then recorded in an
   append-only journal. A re-run reads the journal, keeps the finished shards untouched and continues after them,
   producing the same shards as an uninterrupted build.
5. **Manifest**: ``manifest.json`` (config, counts, bytes, per-shard sha256, rejected rows with reasons) and
   ``rejected.csv``.

``part=(I, N)`` (``--part I/N``) builds only the I-th of N contiguous blocks of the row file's records (0-based),
for slurm arrays: every output name carries the part (``part0001of0004-000000.tar``, its own journal, manifest and
rejected list), so N parts run at once in one ``--out`` and each resumes on its own; ``data_pipelines.parts`` merges
their manifests. The CSV stage (parsing, filters, file checks, duplicates, keys) still reads every row, so a part's
samples are exactly the single build's samples of those rows.

Checked by ``tests/data/test_shard_builder.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from data_pipelines import remote
from data_pipelines.probe import (
    DEFAULT_PROBE_FN,
    DecoderMissingError,
    ProbePool,
    ProbeRequest,
    ProbeResult,
    VideoLocation,
    open_video_stream,
)
from data_pipelines.rows import ROW_FORMATS, CsvSchemaError, RowFile, detect_row_format, open_rows
from genvis.data.schema import (
    CAPTION_EXT,
    CSV_COLUMNS,
    INNER_PATH_COLUMN,
    JOURNAL_NAME,
    MANIFEST_NAME,
    METADATA_EXT,
    REJECTED_NAME,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    VIDEO_EXTS,
    ZIP_COLUMN,
    normalize_header,
    resolve_columns,
    sample_key,
)
from genvis.data.video import DECODERS, log_decoder_choice

logger = logging.getLogger(__name__)

# Fixed tar member mtime, so a re-run (or a resumed run) writes byte-identical shards.
_TAR_MTIME = 0.0


def check_part(part: Any) -> tuple[int, int]:
    """``(I, N)`` as whole numbers with ``0 <= I < N``; raises ValueError saying what was expected and found."""
    example = "e.g. 0/4, 1/4, 2/4, 3/4 for 4 parts (slurm: --array=0-3 and --part $SLURM_ARRAY_TASK_ID/4)"
    try:
        index, count = part
    except (TypeError, ValueError):
        raise ValueError(f"part: expected (I, N), got {part!r}") from None
    if isinstance(index, bool) or isinstance(count, bool) or not isinstance(index, int) or not isinstance(count, int):
        raise ValueError(f"part: expected whole numbers I/N, got {part!r}")
    if count < 1:
        raise ValueError(f"part {index}/{count}: expected N >= 1 parts, got N = {count}")
    if not 0 <= index < count:
        raise ValueError(
            f"part {index}/{count}: expected 0 <= I < N = {count} (parts count from 0), got I = {index}; {example}"
        )
    return index, count


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (``--part``) -> ``(I, N)``; raises ValueError naming what was expected and found."""
    pieces = text.strip().split("/")
    if len(pieces) != 2 or not all(piece.strip().isdecimal() for piece in pieces):
        raise ValueError(
            f"--part: expected I/N with whole numbers 0 <= I < N (part I of N, counted from 0, e.g. 0/4), got {text!r}"
        )
    return check_part((int(pieces[0]), int(pieces[1])))


def part_tag(part: tuple[int, int]) -> str:
    """``(1, 4)`` -> ``part0001of0004``: the part's mark in its output names (zero-padded, so names sort)."""
    index, count = part
    width = max(4, len(str(count)))
    return f"part{index:0{width}d}of{count:0{width}d}"


ENGINES = ("local", "ray")
PROBES_NAME = ".build_probes.jsonl"  # --engine ray: probe results of the finished partitions


@dataclass(frozen=True)
class OutputNames:
    """The file names one build writes in ``--out``: the whole build's, or a part's (every name carries the part, so
    the N parts of a slurm array write into one folder without touching each other's files).

    Args:
        journal: append-only resume journal.
        manifest: ``manifest.json`` (a part: ``manifest.partIofN.json``).
        rejected: ``rejected.csv`` (a part: ``rejected.partIofN.csv``).
        probes: ``--engine ray``'s probe journal.
        shard_prefix: put before ``{shard:06d}.tar`` (a part: ``partIofN-``).
    """

    journal: str
    manifest: str
    rejected: str
    probes: str = PROBES_NAME
    shard_prefix: str = ""

    @classmethod
    def for_part(cls, part: tuple[int, int] | None) -> OutputNames:
        if part is None:
            return cls(JOURNAL_NAME, MANIFEST_NAME, REJECTED_NAME)
        tag = part_tag(part)
        stem, suffix = os.path.splitext(JOURNAL_NAME)
        return cls(
            journal=f"{stem}.{tag}{suffix}",
            manifest=f"{os.path.splitext(MANIFEST_NAME)[0]}.{tag}.json",
            rejected=f"{os.path.splitext(REJECTED_NAME)[0]}.{tag}.csv",
            probes=f"{os.path.splitext(PROBES_NAME)[0]}.{tag}.jsonl",
            shard_prefix=f"{tag}-",
        )

    def shard(self, number: int) -> str:
        return self.shard_prefix + SHARD_PATTERN.format(shard=number)

    def is_shard(self, name: str) -> bool:
        """A name this build's shards (finished or ``.tmp``) take."""
        return re.fullmatch(re.escape(self.shard_prefix) + r"\d{6}\.tar(\.tmp)?", name) is not None

    @property
    def side(self) -> tuple[str, ...]:
        """The other names the build writes besides shards and the journal."""
        return (self.manifest, self.manifest + ".tmp", self.rejected, self.journal + ".tmp", self.probes)


# A part's journal (``.build_journal.partIofN.jsonl``); a whole build and parts never share one --out.
PART_JOURNAL = re.compile(r"^\.build_journal\.part(\d+)of(\d+)\.jsonl$")


@dataclass(frozen=True)
class RangeFilter:
    """A ``--min-<name>`` / ``--max-<name>`` pair on one metadata field.

    Args:
        name: option suffix (``aesthetic`` gives ``--min-aesthetic``/``--max-aesthetic``).
        field: metadata field it reads.
        stage: ``csv`` fields are checked before probing; ``probe`` fields use the decoded video's values.
        help: what the value means.
    """

    name: str
    field: str
    stage: Literal["csv", "probe"]
    help: str


RANGE_FILTERS: tuple[RangeFilter, ...] = (
    RangeFilter("aesthetic", "aesthetic_score", "csv", "CSV 'aesthetic score' (LAION predictor, OpenVid 4.5-8.8)"),
    RangeFilter("motion", "motion_score", "csv", "CSV 'motion score' (UniMatch flow magnitude)"),
    RangeFilter(
        "temporal-consistency",
        "temporal_consistency_score",
        "csv",
        "CSV 'temporal consistency score' (adjacent-frame CLIP similarity)",
    ),
    RangeFilter("seconds", "probed_seconds", "probe", "probed duration in seconds"),
    RangeFilter("fps", "probed_fps", "probe", "probed frame rate"),
    RangeFilter("width", "width", "probe", "probed frame width in pixels"),
    RangeFilter("height", "height", "probe", "probed frame height in pixels"),
)


@dataclass
class BuildConfig:
    """Everything that determines the shards; stored in the journal and manifest so a resume can check it.

    Args:
        csv_path: OpenVid-style rows (CSV, TSV, JSONL or parquet): a path or an fsspec URL.
        video_root: flat video folder (a path or an fsspec URL), a local folder of zip archives (zip layout) or one
            local zip archive.
        out_dir: output folder for shards, manifest and journal.
        shard_max_count: samples per shard at most.
        shard_max_bytes: bytes per shard at most (None: count only); a single larger sample still gets a shard.
        ranges: ``field -> (min, max)`` filters (None for an open end); see ``RANGE_FILTERS``.
        min_frames: reject videos with fewer decoded frames (OpenVid's minimum is 9; a causal VAE needs 1 + 4k).
        max_frames: reject videos with more decoded frames (None: no limit).
        camera_motion: keep only these camera-motion labels (empty: all).
        exclude_camera_motion: drop these camera-motion labels.
        frame_tolerance: allowed relative gap between probed and CSV frame counts before a file counts as truncated.
        probe_mode: ``sparse`` decodes first/middle/last frames; ``full`` decodes all frames.
        probe_timeout_s: seconds one probe may take before its worker is killed.
        probe_fn: ``module:function`` probe run in the workers.
        num_workers: probe worker processes.
        limit: only consider the first ``limit`` CSV rows (None: all).
        input_format: format of ``csv_path``: ``auto`` (from the extension: .csv, .tsv, .jsonl/.ndjson,
            .parquet), or ``csv``, ``tsv``, ``jsonl``, ``parquet`` (see ``data_pipelines.rows``).
        decoder: ``auto`` (decord, else torchcodec, else PyAV) or one of them; a requested decoder that is not
            installed stops the build before any row is probed. Not part of the resume fingerprint (the decoders
            agree on frames, size and fps); the one used is recorded in the manifest.
        part: ``(I, N)``: build only part I (0-based) of N contiguous blocks of the records, under output names of
            that part (see the module docstring); None builds everything. Part of the resume fingerprint.
        engine: ``local`` probes in this machine's worker processes; ``ray`` probes partitions as Ray tasks
            (``data_pipelines.ray_engine``). The shards are the same; not part of the fingerprint (a build started
            with one engine resumes with the other).
        ray_address: the Ray cluster to join (``auto``, ``ray://host:10001``, ...); None starts a local instance.
        partition_size: rows per Ray task, the unit of resume of the probes (``engine="ray"``).
    """

    csv_path: str
    video_root: str
    out_dir: str
    shard_max_count: int = 1000
    shard_max_bytes: int | None = None
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    min_frames: int = 9
    max_frames: int | None = None
    camera_motion: list[str] = field(default_factory=list)
    exclude_camera_motion: list[str] = field(default_factory=list)
    frame_tolerance: float = 0.1
    probe_mode: Literal["sparse", "full"] = "sparse"
    probe_timeout_s: float = 60.0
    probe_fn: str = DEFAULT_PROBE_FN
    num_workers: int = 2
    limit: int | None = None
    decoder: str = "auto"
    input_format: str = "auto"
    part: tuple[int, int] | None = None
    engine: str = "local"
    ray_address: str | None = None
    partition_size: int = 256

    def __post_init__(self) -> None:
        if self.part is not None:
            self.part = check_part(self.part)
        if self.engine not in ENGINES:
            raise ValueError(f"engine: expected one of {list(ENGINES)}, got {self.engine!r}")
        if self.partition_size < 1:
            raise ValueError(f"partition_size: expected >= 1 rows, got {self.partition_size}")
        if self.shard_max_count < 1:
            raise ValueError(f"shard_max_count: expected >= 1, got {self.shard_max_count}")
        if self.shard_max_bytes is not None and self.shard_max_bytes < 1:
            raise ValueError(f"shard_max_bytes: expected >= 1 or None, got {self.shard_max_bytes}")
        known = {spec.field for spec in RANGE_FILTERS}
        for name, (low, high) in self.ranges.items():
            if name not in known:
                raise ValueError(f"ranges: unknown field {name!r}, expected one of {sorted(known)}")
            if low is not None and high is not None and low > high:
                raise ValueError(f"ranges[{name!r}]: min {low} is above max {high}")
        if self.input_format not in ("auto", *ROW_FORMATS):
            raise ValueError(f"input_format: expected one of {['auto', *ROW_FORMATS]}, got {self.input_format!r}")
        if self.decoder not in ("auto", *DECODERS):
            raise ValueError(f"decoder: expected one of {['auto', *DECODERS]}, got {self.decoder!r}")
        if self.probe_mode not in ("sparse", "full"):
            raise ValueError(f"probe_mode: expected 'sparse' or 'full', got {self.probe_mode!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resume must agree on (worker count, timeout and probe hook may change between runs)."""
        fields = dataclasses.asdict(self)
        for volatile in (
            *("num_workers", "probe_timeout_s", "probe_fn", "out_dir", "decoder"),
            *("engine", "ray_address", "partition_size"),
        ):
            fields.pop(volatile)
        fields["ranges"] = {name: list(bounds) for name, bounds in sorted(self.ranges.items())}
        # The row format changes how the file parses; a CSV build leaves it out, so builds made before there was a
        # choice of format keep their fingerprint and still resume.
        fields.pop("input_format")
        fields.pop("part")  # a whole build's fingerprint is the one it had before parts existed
        if self.part is not None:
            fields["part"] = list(self.part)
        row_format = detect_row_format(self.csv_path, self.input_format)
        if row_format != "csv":
            fields["input_format"] = row_format
        fields["csv_path"] = _resolved(self.csv_path)
        fields["video_root"] = _resolved(self.video_root)
        fields["csv_sha256"] = _sha256_file(self.csv_path)
        return fields


@dataclass(frozen=True)
class Rejection:
    """A CSV row that did not become a sample.

    Args:
        line: 1-based line of the row in the CSV (the header is line 1).
        video: the row's ``video`` cell (may be empty for a malformed row).
        stage: ``csv``, ``file``, ``filter`` or ``probe``.
        reason: what was wrong, expected vs got.
    """

    line: int
    video: str
    stage: str
    reason: str


@dataclass
class CsvRow:
    """A parsed, valid CSV row.

    Args:
        index: 0-based position among the CSV's data rows.
        line: 1-based CSV line where the row starts.
        key: unique webdataset ``__key__``.
        values: typed CSV values under schema field names (plus any extra columns, snake_cased).
        location: where the video's bytes are.
    """

    index: int
    line: int
    key: str
    values: dict[str, Any]
    location: VideoLocation


@dataclass
class BuildReport:
    """Outcome of a build.

    Args:
        out_dir: the shard folder.
        shards: file names of all shards, in order.
        num_samples: samples written (including shards finished by an earlier run).
        total_bytes: bytes of all shards.
        rejected: every rejected row.
        resumed_shards: shards kept from an earlier, interrupted run.
        manifest_name: ``manifest.json``, or the part's ``manifest.partIofN.json``.
    """

    out_dir: Path
    shards: list[str]
    num_samples: int
    total_bytes: int
    rejected: list[Rejection]
    resumed_shards: int = 0
    manifest_name: str = MANIFEST_NAME

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / self.manifest_name


class OutputConflictError(FileExistsError):
    """``--out`` holds files under the builder's output names that this build did not write; nothing was touched."""


class BuildEnvironmentError(RuntimeError):
    """Probing failed for a reason of this machine (no decoder), not of the videos; no row was rejected for it."""


def _resolved(path: str) -> str:
    """A URL as given, a local path made absolute (symlinks resolved)."""
    return path if remote.is_url(path) else str(Path(remote.local_path(path)).resolve())


def _sha256_file(path: str | Path) -> str:
    """sha256 of a local file or a URL, streamed."""
    digest = hashlib.sha256()
    handle, _ = remote.open_binary(str(path))
    with handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_cell(raw: str, kind: str) -> Any:
    """Parse a cell as ``kind`` (``NaN`` is None, a missing value); raises ValueError with 'expected ... got ...'."""
    text = raw.strip()
    if kind == "str":
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"expected a {'number' if kind == 'float' else 'whole number'}, got {raw!r}") from None
    if math.isnan(number):
        return None  # pandas writes a missing score as NaN; only a filter on this column needs a value
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {raw!r}")
    if kind == "int":
        if number != int(number):
            raise ValueError(f"expected a whole number, got {raw!r}")
        return int(number)
    return number


# Linux NAME_MAX: the longest file name (one path component) a file system accepts, in bytes.
_NAME_MAX_BYTES = 255


class BadRowError(ValueError):
    """A CSV row that cannot become a sample; the message says which cell is wrong, expected vs got."""


def _check_video_name(name: str, column: str) -> None:
    """Reject names no file system can hold, before any path call raises on them."""
    if "\x00" in name:
        raise BadRowError(f"column {column!r}: contains a NUL byte at character {name.index(chr(0))}, got {name!r}")
    for part in name.replace("\\", "/").split("/"):
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > _NAME_MAX_BYTES:
            raise BadRowError(
                f"column {column!r}: file name of {size} bytes, expected at most {_NAME_MAX_BYTES} "
                f"(file system limit), got {part[:40]!r}..."
            )


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


class _VideoResolver:
    """Maps a CSV row to a ``VideoLocation`` in the flat layout or the zip + inner-path layout."""

    def __init__(self, video_root: str) -> None:
        self.url = video_root if remote.is_url(video_root) else None
        self.root = Path(remote.local_path(video_root))
        self._zip_index: dict[str, dict[str, str]] = {}
        if self.url is not None:
            remote.filesystem(self.url)  # a missing protocol package stops the build here, not every row

    def _locate_url(self, video: str, zip_file: str | None) -> VideoLocation:
        """A video under a URL ``--video-root`` (flat layout only)."""
        assert self.url is not None
        if zip_file or self.url.lower().endswith(".zip"):
            raise BadRowError(
                f"zip layout needs a local --video-root, got the URL {self.url}; copy the zips or unpack them there"
            )
        parts = video.replace("\\", "/").split("/")
        if ".." in parts or video.startswith("/"):
            raise BadRowError(f"column 'video': path {video!r} escapes --video-root {self.url}")
        url = remote.join(self.url, video)
        try:
            found = remote.kind(url)
        except remote.RemoteInputError:
            raise
        except Exception as error:  # a network or permission error of this URL: the row's problem, named
            raise BadRowError(f"cannot stat video {url}: {type(error).__name__}: {error}") from None
        if found is None:
            raise FileNotFoundError(f"video file not found: {url}")
        if found != "file":
            raise BadRowError(f"video path {url} is a {found}, expected a regular video file")
        return VideoLocation(url)

    def _members(self, archive: Path) -> dict[str, str]:
        """Every member of ``archive`` under its full inner path and under its basename."""
        key = str(archive)
        if key not in self._zip_index:
            with zipfile.ZipFile(archive) as handle:
                names = [info.filename for info in handle.infolist() if not info.is_dir()]
            index = {name.rsplit("/", 1)[-1]: name for name in names}
            index.update({name: name for name in names})
            self._zip_index[key] = index
        return self._zip_index[key]

    def locate(self, video: str, zip_file: str | None, inner_path: str | None) -> VideoLocation:
        """Find the bytes of ``video``; raises FileNotFoundError naming where it looked, BadRowError for a name no
        file can have or a path that is not a regular file."""
        _check_video_name(video, "video")
        if zip_file:
            _check_video_name(zip_file, "zip_file")
        if self.url is not None:
            return self._locate_url(video, zip_file)
        if zip_file or self.root.suffix.lower() == ".zip":
            archive = self.root / zip_file if zip_file else self.root
            if not archive.is_file():
                raise FileNotFoundError(f"zip archive not found: {archive}")
            members = self._members(archive)
            wanted = inner_path or video
            member = members.get(wanted) or members.get(wanted.rsplit("/", 1)[-1])
            if member is None:
                raise FileNotFoundError(f"{wanted!r} is not in zip archive {archive}")
            return VideoLocation(str(archive.resolve()), member)
        # Containment is checked on the path as written, so a symlinked sub-folder of --video-root is fine.
        path = Path(os.path.abspath(self.root / video))
        if os.path.relpath(path, os.path.abspath(self.root)).split(os.sep)[0] == os.pardir:
            raise BadRowError(f"column 'video': path {video!r} escapes --video-root {self.root}")
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"video file not found: {path}") from None
        except OSError as error:
            raise BadRowError(f"cannot stat video file {path}: {error.strerror or error}") from None
        if not stat.S_ISREG(mode):
            raise BadRowError(f"video path {path} is {_file_kind(mode)}, expected a regular video file")
        return VideoLocation(str(path))


@dataclass
class _CsvLayout:
    """Where each known column sits in a row file and how its cells parse."""

    name: str
    header: list[str]
    positions: dict[str, int]
    kinds: dict[str, str]
    headers: dict[str, str]
    extras: dict[str, int]


def _read_layout(rows: RowFile, config: BuildConfig) -> _CsvLayout:
    header = rows.header
    columns = (*CSV_COLUMNS, ZIP_COLUMN, INNER_PATH_COLUMN)
    positions = resolve_columns(header, columns)
    missing = [column.header for column in CSV_COLUMNS if column.required and column.field not in positions]
    if missing:
        raise CsvSchemaError(
            f"{rows.where}: missing required column(s) {missing}; expected OpenVid-1M columns like "
            f"{[column.header for column in CSV_COLUMNS]}, got {header}"
        )
    _check_filter_columns(config, positions, rows.where, _FORMAT_NOUNS[rows.format])
    known_positions = set(positions.values())
    return _CsvLayout(
        name=rows.name,
        header=header,
        positions=positions,
        kinds={column.field: column.kind for column in columns},
        headers={column.field: column.header for column in columns},
        extras={
            normalize_header(name).replace(" ", "_"): i for i, name in enumerate(header) if i not in known_positions
        },
    )


def _undecodable_cell(cells: list[str], layout: _CsvLayout) -> str | None:
    """Reason a row holds bytes that are not UTF-8 (read with ``surrogateescape``), or None."""
    names = {position: layout.headers.get(field_name, field_name) for field_name, position in layout.positions.items()}
    names.update({position: name for name, position in layout.extras.items()})
    for position, cell in enumerate(cells):
        bad = next((i for i, char in enumerate(cell) if "\udc80" <= char <= "\udcff"), None)
        if bad is None:
            continue
        raw = cell.encode("utf-8", "surrogateescape")
        byte = ord(cell[bad]) - 0xDC00
        guess = raw.decode("cp1252", "replace")
        column = names.get(position, f"#{position + 1}")
        return (
            f"column {column!r}: expected UTF-8 text, got byte 0x{byte:02x} at character {bad} "
            f"(as cp1252 the cell reads {guess!r}); re-save the CSV as UTF-8"
        )
    return None


def _parse_row(cells: list[str], layout: _CsvLayout) -> dict[str, Any]:
    """Typed values of a row under schema field names (plus extra columns); raises BadRowError."""
    if len(cells) != len(layout.header):
        raise BadRowError(f"expected {len(layout.header)} fields (header of {layout.name}), got {len(cells)}")
    problem = _undecodable_cell(cells, layout)
    if problem:
        raise BadRowError(problem)
    values: dict[str, Any] = {}
    for name, position in layout.positions.items():
        raw = cells[position]
        if not raw.strip():
            if name in ("video", "caption"):
                raise BadRowError(f"column {layout.headers[name]!r}: expected a non-empty value, got {raw!r}")
            values[name] = None
            continue
        try:
            values[name] = _parse_cell(raw, layout.kinds[name])
        except ValueError as error:
            raise BadRowError(f"column {layout.headers[name]!r}: {error}") from None
    values.update({name: cells[position] for name, position in layout.extras.items()})
    return values


def _location_identity(location: VideoLocation) -> str:
    """The same string for every spelling of one file (``./a.mp4``, ``a.mp4``, a symlink to it)."""
    if remote.is_url(location.path):
        return location.path
    path = os.path.realpath(location.path)
    return f"{path}::{location.member}" if location.member else path


def part_bounds(num_records: int, part: tuple[int, int]) -> tuple[int, int]:
    """Records ``[start, end)`` (0-based positions among the row file's records) of part ``(I, N)``: N contiguous
    blocks whose sizes differ by at most one."""
    index, count = part
    return index * num_records // count, (index + 1) * num_records // count


@dataclass
class _RowsRead:
    rows: list[CsvRow]
    rejected: list[Rejection]
    num_records: int  # records of the whole file considered (within --limit), all parts together
    bounds: tuple[int, int] | None  # the part's records, None for a whole build


def read_csv_rows(config: BuildConfig) -> tuple[list[CsvRow], list[Rejection]]:
    """Parse and validate the row file (CSV, TSV, JSONL or parquet), locate every video and apply the CSV-stage
    filters.

    A bad row (wrong field count, bad number, bytes that are not UTF-8, a NUL byte or an over-long file name, a
    JSONL line that is not a JSON object, a missing or non-regular file, a second row for the same file) is rejected
    with its line (parquet: its row number); the other rows go on. With ``config.part`` every row is still read and
    checked (duplicates and keys are those of the whole file) but only the part's rows and rejections are returned.

    Raises:
        CsvSchemaError: the file is unreadable, empty, of an unknown format, or lacks the ``video`` or ``caption``
            column.
    """
    read = _read_rows(config)
    return read.rows, read.rejected


def _read_rows(config: BuildConfig) -> _RowsRead:
    resolver = _VideoResolver(config.video_root)
    rows: list[CsvRow] = []
    rejected: list[Rejection] = []
    # Position of each row / rejection among the file's records, for picking a part's block afterwards.
    row_records: list[int] = []
    rejected_records: list[int] = []
    record_number = -1

    def reject(rejection: Rejection) -> None:
        rejected.append(rejection)
        rejected_records.append(record_number)

    with open_rows(config.csv_path, config.input_format) as row_file:
        layout = _read_layout(row_file, config)
        video_position = layout.positions["video"]
        seen: dict[str, int] = {}
        used_keys: set[str] = set()
        index = -1
        for record in row_file.records:
            line, cells = record.line, record.cells
            if cells is not None and config.limit is not None and index + 1 >= config.limit:
                break
            record_number += 1
            if cells is None:
                reject(Rejection(line, "", "csv", record.error or "unreadable row"))
                continue
            index += 1
            video_cell = cells[video_position].strip() if video_position < len(cells) else ""
            video_cell = video_cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            try:
                values = _parse_row(cells, layout)
            except BadRowError as error:
                reject(Rejection(line, video_cell, "csv", str(error)))
                continue
            video = values["video"]
            filter_reason = _csv_filter_reason(config, values)
            if filter_reason:
                reject(Rejection(line, video, "filter", filter_reason))
                continue
            try:
                location = resolver.locate(video, values.pop("zip_file", None), values.pop("video_path", None))
            except (OSError, ValueError, zipfile.BadZipFile) as error:
                reason = str(error) if isinstance(error, BadRowError) else f"{type(error).__name__}: {error}"
                reject(Rejection(line, video, "file", reason))
                continue
            identity = _location_identity(location)
            if identity in seen:
                reason = f"duplicate video {video!r}: the same file as line {seen[identity]} ({location})"
                reject(Rejection(line, video, "csv", reason))
                continue
            seen[identity] = line
            key = sample_key(video)
            if key in used_keys:
                key = f"{key}_L{line}"  # two names that sanitise to the same key (a.b.mp4 and a_b.mp4)
            used_keys.add(key)
            rows.append(CsvRow(index, line, key, values, location))
            row_records.append(record_number)
    num_records = record_number + 1
    if config.part is None:
        return _RowsRead(rows, rejected, num_records, None)
    start, end = part_bounds(num_records, config.part)
    return _RowsRead(
        [row for row, number in zip(rows, row_records) if start <= number < end],
        [rejection for rejection, number in zip(rejected, rejected_records) if start <= number < end],
        num_records,
        (start, end),
    )


_FORMAT_NOUNS = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSONL file", "parquet": "parquet file"}


def _check_filter_columns(config: BuildConfig, positions: dict[str, int], where: str, noun: str) -> None:
    headers = {column.field: column.header for column in CSV_COLUMNS}
    for spec in RANGE_FILTERS:
        if spec.stage == "csv" and spec.field in config.ranges and spec.field not in positions:
            raise CsvSchemaError(
                f"{where}: --min/--max-{spec.name} filters column {headers[spec.field]!r}, which the {noun} lacks"
            )
    if (config.camera_motion or config.exclude_camera_motion) and "camera_motion" not in positions:
        raise CsvSchemaError(f"{where}: camera-motion filter needs column 'camera motion', which the {noun} lacks")


def _range_reason(name: str, value: Any, bounds: tuple[float | None, float | None]) -> str | None:
    low, high = bounds
    if value is None:
        return f"{name} is missing, a range filter needs it"
    if low is not None and value < low:
        return f"{name} {value} < min {low}"
    if high is not None and value > high:
        return f"{name} {value} > max {high}"
    return None


def _csv_filter_reason(config: BuildConfig, values: dict[str, Any]) -> str | None:
    for spec in RANGE_FILTERS:
        if spec.stage == "csv" and spec.field in config.ranges:
            reason = _range_reason(spec.field, values.get(spec.field), config.ranges[spec.field])
            if reason:
                return reason
    camera = values.get("camera_motion")
    if config.camera_motion and camera not in config.camera_motion:
        return f"camera_motion {camera!r} not in {config.camera_motion}"
    if config.exclude_camera_motion and camera in config.exclude_camera_motion:
        return f"camera_motion {camera!r} is excluded"
    return None


def _probe_filter_reason(config: BuildConfig, info: dict[str, Any]) -> str | None:
    if info["probed_frames"] < config.min_frames:
        return f"too short: {info['probed_frames']} frames < min_frames {config.min_frames}"
    if config.max_frames is not None and info["probed_frames"] > config.max_frames:
        return f"too long: {info['probed_frames']} frames > max_frames {config.max_frames}"
    for spec in RANGE_FILTERS:
        if spec.stage == "probe" and spec.field in config.ranges:
            reason = _range_reason(spec.field, info.get(spec.field), config.ranges[spec.field])
            if reason:
                return reason
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Journal (resume state and proof of which files this build wrote)

# Names the builder writes in --out (``OutputNames``; the journal itself aside). A file under one of them that the
# journal does not list belongs to someone else: the build refuses to start rather than delete or overwrite it.


@dataclass
class _ShardRecord:
    name: str
    count: int
    bytes: int
    sha256: str
    keys: list[str]
    last_index: int
    rejected: list[dict[str, Any]]


@dataclass
class _Journal:
    """What an earlier run in the folder recorded.

    Args:
        exists: a journal file is there (the folder holds a build of this tool).
        config: the earlier run's config fingerprint (None when there is none).
        finished: shards verified on disk, in order (resume keeps them).
        owned: every shard name the earlier runs opened (``.tar`` and ``.tar.tmp``), finished or not.
        changed: journaled shards whose size on disk differs from the record (someone else's file now).
    """

    exists: bool = False
    config: dict[str, Any] | None = None
    finished: list[_ShardRecord] = field(default_factory=list)
    owned: set[str] = field(default_factory=set)
    changed: list[str] = field(default_factory=list)


def _append_journal(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _journal_records(path: Path, what: str = "journal") -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines journal, up to a torn last line (a run killed mid-write), which is logged."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for number, text in enumerate(lines, start=1):
        try:
            yield json.loads(text)
        except json.JSONDecodeError:
            logger.warning("%s:%d: ignoring a torn %s line (killed mid-write)", path, number, what)
            return


def _rewrite_journal(
    out_dir: Path, names: OutputNames, fingerprint: dict[str, Any], finished: list[_ShardRecord]
) -> None:
    """Atomically replace the journal by the config and the shards kept (stale entries were cleaned up)."""
    tmp = out_dir / (names.journal + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"type": "config", "config": fingerprint}) + "\n")
        for record in finished:
            handle.write(json.dumps({"type": "open", "name": record.name}) + "\n")
            handle.write(json.dumps({"type": "shard", **dataclasses.asdict(record)}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out_dir / names.journal)


def _load_journal(out_dir: Path, names: OutputNames) -> _Journal:
    """The earlier runs' records; finished shards are checked against the files on disk."""
    path = out_dir / names.journal
    if not path.is_file():
        return _Journal()
    journal = _Journal(exists=True)
    intact = True
    for record in _journal_records(path):
        if record["type"] == "config":
            journal.config = record["config"]
        elif record["type"] == "open":
            journal.owned.update({record["name"], record["name"] + ".tmp"})
        elif record["type"] == "shard":
            shard = _ShardRecord(**{k: v for k, v in record.items() if k != "type"})
            journal.owned.update({shard.name, shard.name + ".tmp"})
            shard_path = out_dir / shard.name
            if shard_path.is_file() and shard_path.stat().st_size != shard.bytes:
                journal.changed.append(
                    f"{shard_path} (journal: {shard.bytes} bytes written by this build, now {shard_path.stat().st_size})"
                )
            if intact and shard_path.is_file() and shard_path.stat().st_size == shard.bytes:
                journal.finished.append(shard)
            elif intact:
                logger.warning("%s: missing since the journal recorded it; rebuilding from here", shard_path)
                intact = False
    return journal


def _foreign_outputs(out_dir: Path, journal: _Journal, names: OutputNames) -> list[str]:
    """Files under the builder's output names that no run of this build wrote."""
    ours = set(journal.owned) | (set(names.side) if journal.exists else set())
    listed = sorted(os.listdir(out_dir))
    foreign = [
        str(out_dir / name) for name in listed if (names.is_shard(name) or name in names.side) and name not in ours
    ]
    return foreign + journal.changed


def _check_not_mixed(out_dir: Path, names: OutputNames) -> None:
    """A whole build and part builds never share one --out (their manifests would describe different shard sets)."""
    if names.journal == JOURNAL_NAME:
        parts = sorted(name for name in os.listdir(out_dir) if PART_JOURNAL.match(name))
        if parts:
            raise OutputConflictError(
                f"{out_dir}: holds a --part build ({', '.join(parts)}); build the whole row file into another --out, "
                "or run the remaining parts and `genvis-shards merge` them"
            )
    elif (out_dir / JOURNAL_NAME).is_file():
        raise OutputConflictError(
            f"{out_dir}: holds a whole (non --part) build ({out_dir / JOURNAL_NAME}); build the parts into another --out"
        )


def _claim_out_dir(
    out_dir: Path, fingerprint: dict[str, Any], overwrite: bool, names: OutputNames
) -> list[_ShardRecord]:
    """Check --out, remove this build's own stale files and return the finished shards a resume keeps.

    Raises:
        OutputConflictError: an output name is taken by a file this build did not write (listed; nothing removed),
            or --out holds a whole build and this is a part build (or the other way round).
        ValueError: --out holds a build with other options and ``overwrite`` is off.
    """
    _check_not_mixed(out_dir, names)
    journal = _load_journal(out_dir, names)
    foreign = _foreign_outputs(out_dir, journal, names)
    if foreign:
        raise OutputConflictError(
            f"{out_dir}: {len(foreign)} file(s) under the builder's output names were not written by this build, "
            "and are never deleted or overwritten: " + ", ".join(foreign) + "; move them away or choose another --out"
        )
    if journal.config is not None and journal.config != fingerprint and not overwrite:
        differing = sorted(k for k in fingerprint if journal.config.get(k) != fingerprint[k])
        raise ValueError(
            f"{out_dir}: holds a build with different options (differs in {differing}); "
            "pass --overwrite to rebuild or choose another --out"
        )
    finished = [] if overwrite else journal.finished
    keep = {record.name for record in finished}
    for name in sorted(journal.owned - keep):
        (out_dir / name).unlink(missing_ok=True)
    if overwrite:
        for name in (names.manifest, names.rejected, names.probes):
            (out_dir / name).unlink(missing_ok=True)
    _rewrite_journal(out_dir, names, fingerprint, finished)
    return finished


# ---------------------------------------------------------------------------------------------------------------------
# Shard writing

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a closed archive to whole records


def _tar_member_bytes(size: int) -> int:
    """Bytes one member takes in a tar: a header block plus its data padded to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a closed tar whose members take ``member_bytes``: two zero end blocks, padded to a whole record."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _video_extension(row: CsvRow, info: dict[str, Any]) -> str:
    """Member extension naming the video's container (sniffed), else the file's own if known, else ``video``."""
    if info.get("container"):
        return str(info["container"])
    name = row.location.member or row.location.path
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return suffix if suffix in VIDEO_EXTS else "video"


class _ShardSink:
    """Streams samples into ``{shard:06d}.tar.tmp`` (video bytes copied in chunks, never held in memory) and renames
    each shard into place when it is full. Member layout and headers are those of ``webdataset.TarWriter``."""

    def __init__(self, config: BuildConfig, out_dir: Path, first_shard: int, names: OutputNames) -> None:
        self.config = config
        self.out_dir = out_dir
        self.names = names
        self.journal = out_dir / names.journal
        self.shard = first_shard
        self.handle: Any = None
        self.tar: tarfile.TarFile | None = None
        self.keys: list[str] = []
        self.member_bytes = 0
        self.pending_rejections: list[Rejection] = []
        self.last_processed = -1
        self.finished: list[_ShardRecord] = []

    @property
    def _tmp_path(self) -> Path:
        return self.out_dir / (self.names.shard(self.shard) + ".tmp")

    def _open(self) -> None:
        # Journal the name first: whatever a kill leaves under it is provably this build's to remove.
        _append_journal(self.journal, {"type": "open", "name": self.names.shard(self.shard)})
        self.handle = open(self._tmp_path, "wb")  # noqa: SIM115 (open across many write calls, closed in finish)
        self.tar = tarfile.open(fileobj=self.handle, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.keys, self.member_bytes = [], 0

    def _add(self, name: str, size: int, stream: Any) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o444
        info.uname = info.gname = "bigdata"
        self.tar.addfile(info, stream)

    def write(self, row: CsvRow, info: dict[str, Any]) -> str | None:
        """Add one sample, or return why it cannot be read any more (nothing is written then)."""
        try:
            stream, size = open_video_stream(row.location)
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            return f"read failed after probe: {type(error).__name__}: {error}"
        if size < 0:
            stream.close()
            return f"size unknown: {row.location} gave no length (a tar member needs one); expected a byte size"
        with stream:
            metadata = {**row.values, **info, "csv_line": row.line, "schema_version": SCHEMA_VERSION}
            members = {
                METADATA_EXT: json.dumps(metadata).encode("utf-8"),
                CAPTION_EXT: row.values["caption"].encode("utf-8"),
            }
            video_ext = _video_extension(row, info)
            sample_bytes = _tar_member_bytes(size) + sum(_tar_member_bytes(len(data)) for data in members.values())
            limit = self.config.shard_max_bytes
            full = limit is not None and _tar_file_bytes(self.member_bytes + sample_bytes) > limit
            if self.tar is not None and full:
                self.finish()
            if self.tar is None:
                self._open()
            for ext in sorted([*members, video_ext]):
                name = f"{row.key}.{ext}"
                if ext == video_ext:
                    try:
                        self._add(name, size, stream)
                    except OSError as error:
                        raise OSError(
                            f"{row.location} changed while it was copied into {self._tmp_path} ({error}); "
                            "re-run the same command to resume"
                        ) from error
                else:
                    self._add(name, len(members[ext]), io.BytesIO(members[ext]))
        self.keys.append(row.key)
        self.member_bytes += sample_bytes
        self.last_processed = row.index
        if len(self.keys) >= self.config.shard_max_count:
            self.finish()
        return None

    def reject(self, index: int, rejection: Rejection) -> None:
        self.pending_rejections.append(rejection)
        self.last_processed = index

    def finish(self) -> None:
        """Close, fsync and rename the open shard, then journal it (only a journaled shard counts as finished)."""
        if self.tar is None:
            return
        self.tar.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.tar = self.handle = None
        tmp_path = self._tmp_path
        final = self.out_dir / self.names.shard(self.shard)
        os.replace(tmp_path, final)
        record = _ShardRecord(
            name=final.name,
            count=len(self.keys),
            bytes=final.stat().st_size,
            sha256=_sha256_file(final),
            keys=self.keys,
            last_index=self.last_processed,  # rejected rows after the last sample are recorded here too
            rejected=[dataclasses.asdict(r) for r in self.pending_rejections],
        )
        _append_journal(self.journal, {"type": "shard", **dataclasses.asdict(record)})
        self.finished.append(record)
        self.pending_rejections = []
        self.shard += 1

    def close(self) -> None:
        """Close an unfinished shard's file (interrupted build: the ``.tmp`` stays, journaled as this build's)."""
        if self.handle is not None:
            self.handle.close()
            self.tar = self.handle = None


def _ordered(results: Iterator[ProbeResult], order: list[int]) -> Iterator[ProbeResult]:
    """Re-order unordered probe results into ``order`` (CSV order), so shard contents do not depend on timing."""
    buffer: dict[int, ProbeResult] = {}
    position = 0
    for result in results:
        buffer[result.index] = result
        while position < len(order) and order[position] in buffer:
            yield buffer.pop(order[position])
            position += 1


def _log_decoder(config: BuildConfig) -> str:
    """One line naming the decoder probes use and why; a requested decoder that is not installed (or no decoder at
    all) stops the build before any row is touched. Returns the decoder's name (``custom`` for a ``--probe-fn``)."""
    if config.probe_fn != DEFAULT_PROBE_FN:
        return "custom"
    try:
        return log_decoder_choice("genvis-shards build: probes", config.decoder)
    except DecoderMissingError as error:
        raise BuildEnvironmentError(str(error)) from error


def _environment_failure(config: BuildConfig, row: CsvRow, result: ProbeResult) -> BuildEnvironmentError:
    return BuildEnvironmentError(
        f"{config.csv_path}:{row.line}: probing {row.values['video']!r} failed for a reason of this machine, not of "
        f"the video ({result.reason}); no row was rejected for it. Fix the environment and re-run the same command "
        "to resume."
    )


def _check_not_all_crashed(rejected: list[Rejection], num_samples: int) -> None:
    """Every probe dying the same way (a decoder that cannot run here) is an environment failure, not a dataset."""
    probed = [r for r in rejected if r.stage == "probe"]
    reasons = {r.reason for r in probed}
    if num_samples == 0 and len(probed) >= 2 and len(reasons) == 1:
        reason = next(iter(reasons))
        if reason.startswith(("probe process crashed", "probe raised")):
            raise BuildEnvironmentError(
                f"all {len(probed)} probed videos failed the same way ({reason}) and no sample was written: the "
                "decoder does not work on this machine; no dataset was recorded"
            )


def build_shards(config: BuildConfig, overwrite: bool = False, progress: bool = True) -> BuildReport:
    """Build (or resume building) the shards described by ``config``; returns the report also saved as manifest.

    Raises:
        CsvSchemaError: the CSV cannot be used (nothing is created).
        OutputConflictError: --out holds files under the output names that this build did not write.
        BuildEnvironmentError: no decoder works on this machine (shards finished so far are kept for a resume).
    """
    out_dir = Path(config.out_dir)
    names = OutputNames.for_part(config.part)
    # Read the CSV first: a schema error must not leave an output folder or a journal behind.
    read = _read_rows(config)
    rows, rejected = read.rows, read.rejected
    fingerprint = config.fingerprint()
    decoder = _log_decoder(config)
    if config.engine == "ray":
        from data_pipelines.probe import resolve_probe_fn
        from data_pipelines.ray_engine import RayUnavailableError, import_ray

        resolve_probe_fn(config.probe_fn)  # a bad --probe-fn fails here, not in every Ray task
        try:
            import_ray()
        except RayUnavailableError as error:
            raise BuildEnvironmentError(str(error)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = _claim_out_dir(out_dir, fingerprint, overwrite, names)
    if config.part is not None:
        logger.info(
            "part %d/%d: records %d-%d of %d (%d rows to probe)",
            *config.part,
            *read.bounds,
            read.num_records,
            len(rows),
        )

    resume_index = finished[-1].last_index if finished else -1
    done_keys = {key for record in finished for key in record.keys}
    todo = [row for row in rows if row.index > resume_index and row.key not in done_keys]
    by_index = {row.index: row for row in todo}
    if finished:
        logger.info("resuming %s: %d finished shards kept, %d rows left", out_dir, len(finished), len(todo))

    sink = _ShardSink(config, out_dir, first_shard=len(finished), names=names)
    requests = (
        ProbeRequest(
            row.index,
            row.location,
            row.values.get("frame"),
            config.frame_tolerance,
            mode=config.probe_mode,
            # The workers use the decoder named in the log line (a custom probe resolves config.decoder itself).
            decoder=config.decoder if decoder == "custom" else decoder,
        )
        for row in todo
    )
    pool = None
    if config.engine == "ray":
        from data_pipelines.ray_engine import ray_probe_results

        results = ray_probe_results(
            list(requests),
            probe_journal=out_dir / names.probes,
            header={"config": fingerprint, "probe_fn": config.probe_fn},
            partition_size=config.partition_size,
            timeout_s=config.probe_timeout_s,
            probe_fn=config.probe_fn,
            address=config.ray_address,
            num_cpus=config.num_workers,
        )
    else:
        pool = ProbePool(config.num_workers, config.probe_timeout_s, config.probe_fn)
        results = pool.imap_unordered(requests)
    counts = {"ok": sum(record.count for record in finished), "rejected": 0}
    bar = tqdm(total=len(todo), desc=f"shards -> {out_dir}", unit="video", disable=not progress, file=sys.stderr)
    try:
        for result in _ordered(results, [row.index for row in todo]):
            row = by_index[result.index]
            if result.environment:
                sink.finish()  # keep the samples written so far; a re-run resumes after them
                raise _environment_failure(config, row, result)
            reason = result.reason if not result.ok else _probe_filter_reason(config, result.info)
            stage = "probe" if not result.ok else "filter"
            if not reason:
                reason, stage = sink.write(row, result.info), "file"
                counts["ok"] += reason is None
            if reason:
                sink.reject(row.index, Rejection(row.line, row.values["video"], stage, reason))
                logger.info("%s:%d: rejected %s: %s", config.csv_path, row.line, row.values["video"], reason)
                counts["rejected"] += 1
            bar.update(1)
            bar.set_postfix(counts, refresh=False)
        sink.finish()
    finally:
        sink.close()
        bar.close()
        if pool is not None:
            pool.close()
        else:
            results.close()  # stops the Ray tasks (and a local Ray instance this build started)

    records = finished + sink.finished
    all_rejected = rejected + [Rejection(**r) for record in records for r in record.rejected]
    all_rejected += sink.pending_rejections  # rejections after the last written sample
    all_rejected.sort(key=lambda rejection: rejection.line)
    report = BuildReport(
        out_dir=out_dir,
        shards=[record.name for record in records],
        num_samples=sum(record.count for record in records),
        total_bytes=sum(record.bytes for record in records),
        rejected=all_rejected,
        resumed_shards=len(finished),
        manifest_name=names.manifest,
    )
    _check_not_all_crashed(all_rejected, report.num_samples)
    part = None
    if config.part is not None:
        part = {"index": config.part[0], "count": config.part[1], "records": list(read.bounds)}
        part["records_in_file"] = read.num_records
    _write_manifest(config, fingerprint, report, records, len(rows) + len(rejected), decoder, names=names, part=part)
    return report


def _write_manifest(
    config: BuildConfig,
    fingerprint: dict[str, Any],
    report: BuildReport,
    records: list[_ShardRecord],
    num_rows: int,
    decoder: str,
    names: OutputNames,
    part: dict[str, Any] | None = None,
) -> None:
    reasons: dict[str, int] = {}
    for rejection in report.rejected:
        reasons[rejection.stage] = reasons.get(rejection.stage, 0) + 1
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "csv": str(config.csv_path),
        "video_root": str(config.video_root),
        "config": fingerprint,
        "decoder": decoder,
        "engine": config.engine,
        "num_rows": num_rows,
        "num_samples": report.num_samples,
        "num_rejected": len(report.rejected),
        "rejected_by_stage": reasons,
        "num_shards": len(records),
        "total_bytes": report.total_bytes,
        "shards": [
            {
                "name": record.name,
                "count": record.count,
                "bytes": record.bytes,
                "sha256": record.sha256,
                "first_key": record.keys[0],
                "last_key": record.keys[-1],
            }
            for record in records
        ],
        "rejected": [dataclasses.asdict(rejection) for rejection in report.rejected],
    }
    if part is not None:
        manifest["part"] = part
    write_manifest_files(report.out_dir, manifest, names.manifest, names.rejected)


def write_manifest_files(out_dir: Path, manifest: dict[str, Any], manifest_name: str, rejected_name: str) -> None:
    """Write ``manifest`` (atomically) and its rejected rows as CSV."""
    tmp = out_dir / (manifest_name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / manifest_name)
    with open(out_dir / rejected_name, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", "video", "stage", "reason"])
        writer.writerows((r["line"], r["video"], r["stage"], r["reason"]) for r in manifest["rejected"])


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a shard folder; raises FileNotFoundError naming the folder when there is none."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir}: no {MANIFEST_NAME}; build shards with `genvis-shards build` first")
    return json.loads(path.read_text(encoding="utf-8"))
