"""Build webdataset shards from an OpenVid-1M style CSV and a video folder (or zip archives), resumably.

Stages, in CSV order:
1. **CSV**: parse every row; a row with a wrong field count, an empty required cell or a bad number is rejected with
   its line number, column, expected type and the value found. Score filters (aesthetic, motion, temporal
   consistency, camera motion) run here, before any decoding.
2. **File**: find the video in the flat folder (``video`` column) or in a zip archive (``zip_file`` + ``video_path``
   columns, or ``--video-root`` pointing at a zip); a missing file is rejected.
3. **Probe**: decord decodes each video in a worker subprocess with a timeout (``data_pipelines.probe``); corrupt,
   truncated, empty, non-video, hanging or crashing files are rejected. Duration, fps, frame-count and resolution
   filters run on the probed values.
4. **Write**: accepted samples go, in CSV order, into ``{shard:06d}.tar`` (``__key__``, ``mp4``, ``txt``, ``json``) via
   ``webdataset.TarWriter``; each shard is written as ``.tmp``, renamed when complete and then recorded in an
   append-only journal. A re-run reads the journal, keeps the finished shards untouched and continues after them,
   producing the same shards as an uninterrupted build.
5. **Manifest**: ``manifest.json`` (config, counts, bytes, per-shard sha256, rejected rows with reasons) and
   ``rejected.csv``.

Checked by ``tests/data/test_shard_builder.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import webdataset as wds
from tqdm.auto import tqdm

from data_pipelines.probe import (
    DEFAULT_PROBE_FN,
    ProbePool,
    ProbeRequest,
    ProbeResult,
    VideoLocation,
    read_video_bytes,
)
from genvis.data.schema import (
    CSV_COLUMNS,
    INNER_PATH_COLUMN,
    JOURNAL_NAME,
    MANIFEST_NAME,
    REJECTED_NAME,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    ZIP_COLUMN,
    normalize_header,
    resolve_columns,
    sample_key,
)

logger = logging.getLogger(__name__)

# Fixed tar member mtime, so a re-run (or a resumed run) writes byte-identical shards.
_TAR_MTIME = 0.0


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
        csv_path: OpenVid-style CSV.
        video_root: flat video folder, a folder of zip archives (zip layout) or one zip archive.
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

    def __post_init__(self) -> None:
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
        if self.probe_mode not in ("sparse", "full"):
            raise ValueError(f"probe_mode: expected 'sparse' or 'full', got {self.probe_mode!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resume must agree on (worker count, timeout and probe hook may change between runs)."""
        fields = dataclasses.asdict(self)
        for volatile in ("num_workers", "probe_timeout_s", "probe_fn", "out_dir"):
            fields.pop(volatile)
        fields["ranges"] = {name: list(bounds) for name, bounds in sorted(self.ranges.items())}
        fields["csv_path"] = str(Path(self.csv_path).resolve())
        fields["video_root"] = str(Path(self.video_root).resolve())
        fields["csv_sha256"] = _sha256_file(Path(self.csv_path))
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
    """

    out_dir: Path
    shards: list[str]
    num_samples: int
    total_bytes: int
    rejected: list[Rejection]
    resumed_shards: int = 0

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME


class CsvSchemaError(ValueError):
    """The CSV cannot be used at all (unreadable, or a required column is missing)."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_cell(raw: str, kind: str) -> Any:
    """Parse a cell as ``kind``; raises ValueError with 'expected ... got ...'."""
    text = raw.strip()
    if kind == "str":
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"expected a {'number' if kind == 'float' else 'whole number'}, got {raw!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {raw!r}")
    if kind == "int":
        if number != int(number):
            raise ValueError(f"expected a whole number, got {raw!r}")
        return int(number)
    return number


class _VideoResolver:
    """Maps a CSV row to a ``VideoLocation`` in the flat layout or the zip + inner-path layout."""

    def __init__(self, video_root: Path) -> None:
        self.root = video_root
        self._zip_index: dict[str, dict[str, str]] = {}

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
        """Find the bytes of ``video``; raises FileNotFoundError naming where it looked."""
        if zip_file or self.root.suffix.lower() == ".zip":
            archive = self.root / zip_file if zip_file else self.root
            if not archive.is_file():
                raise FileNotFoundError(f"zip archive not found: {archive}")
            members = self._members(archive)
            wanted = inner_path or video
            member = members.get(wanted) or members.get(wanted.rsplit("/", 1)[-1])
            if member is None:
                raise FileNotFoundError(f"{wanted!r} is not in zip archive {archive}")
            return VideoLocation(str(archive), member)
        path = (self.root / video).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise FileNotFoundError(f"video path {video!r} escapes --video-root {self.root}")
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        return VideoLocation(str(path))


def read_csv_rows(config: BuildConfig) -> tuple[list[CsvRow], list[Rejection]]:
    """Parse and validate the CSV, locate every video and apply the CSV-stage filters.

    Raises:
        CsvSchemaError: the CSV is unreadable, empty, or lacks the ``video`` or ``caption`` column.
    """
    csv_path = Path(config.csv_path)
    resolver = _VideoResolver(Path(config.video_root))
    rows: list[CsvRow] = []
    rejected: list[Rejection] = []
    if not csv_path.is_file():
        raise CsvSchemaError(f"{csv_path}: CSV file not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise CsvSchemaError(f"{csv_path}: empty file, expected an OpenVid-1M header line") from None
        except csv.Error as error:
            raise CsvSchemaError(f"{csv_path}:1: unreadable header ({error})") from error
        columns = (*CSV_COLUMNS, ZIP_COLUMN, INNER_PATH_COLUMN)
        positions = resolve_columns(header, columns)
        missing = [column.header for column in CSV_COLUMNS if column.required and column.field not in positions]
        if missing:
            raise CsvSchemaError(
                f"{csv_path}:1: missing required column(s) {missing}; expected OpenVid-1M header like "
                f"{[column.header for column in CSV_COLUMNS]}, got {header}"
            )
        _check_filter_columns(config, positions, csv_path)
        kinds = {column.field: column.kind for column in columns}
        headers = {column.field: column.header for column in columns}
        known_positions = set(positions.values())
        extras = {
            normalize_header(name).replace(" ", "_"): i for i, name in enumerate(header) if i not in known_positions
        }
        seen_videos: dict[str, int] = {}
        used_keys: set[str] = set()
        line = 1
        index = -1
        while True:
            start_line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                rejected.append(Rejection(start_line, "", "csv", f"unparseable CSV record: {error}"))
                continue
            line = start_line
            if not cells or all(not cell.strip() for cell in cells):
                continue  # blank lines are not rows
            index += 1
            if config.limit is not None and index >= config.limit:
                break
            video_cell = cells[positions["video"]].strip() if positions["video"] < len(cells) else ""
            if len(cells) != len(header):
                reason = f"expected {len(header)} fields (header of {csv_path.name}), got {len(cells)}"
                rejected.append(Rejection(line, video_cell, "csv", reason))
                continue
            values: dict[str, Any] = {}
            problem = None
            for name, position in positions.items():
                raw = cells[position]
                if not raw.strip():
                    if name in ("video", "caption"):
                        problem = f"column {headers[name]!r}: expected a non-empty value, got {raw!r}"
                        break
                    values[name] = None
                    continue
                try:
                    values[name] = _parse_cell(raw, kinds[name])
                except ValueError as error:
                    problem = f"column {headers[name]!r}: {error}"
                    break
            if problem:
                rejected.append(Rejection(line, video_cell, "csv", problem))
                continue
            values.update({name: cells[position] for name, position in extras.items()})
            video = values["video"]
            if video in seen_videos:
                reason = f"duplicate video {video!r} (first on line {seen_videos[video]})"
                rejected.append(Rejection(line, video, "csv", reason))
                continue
            seen_videos[video] = line
            filter_reason = _csv_filter_reason(config, values)
            if filter_reason:
                rejected.append(Rejection(line, video, "filter", filter_reason))
                continue
            try:
                location = resolver.locate(video, values.pop("zip_file", None), values.pop("video_path", None))
            except (FileNotFoundError, zipfile.BadZipFile) as error:
                rejected.append(Rejection(line, video, "file", f"{type(error).__name__}: {error}"))
                continue
            key = sample_key(video)
            if key in used_keys:
                key = f"{key}_L{line}"  # two names that sanitise to the same key (a.b.mp4 and a_b.mp4)
            used_keys.add(key)
            rows.append(CsvRow(index, line, key, values, location))
    return rows, rejected


def _check_filter_columns(config: BuildConfig, positions: dict[str, int], csv_path: Path) -> None:
    headers = {column.field: column.header for column in CSV_COLUMNS}
    for spec in RANGE_FILTERS:
        if spec.stage == "csv" and spec.field in config.ranges and spec.field not in positions:
            raise CsvSchemaError(
                f"{csv_path}:1: --min/--max-{spec.name} filters column {headers[spec.field]!r}, which the CSV lacks"
            )
    if (config.camera_motion or config.exclude_camera_motion) and "camera_motion" not in positions:
        raise CsvSchemaError(f"{csv_path}:1: camera-motion filter needs column 'camera motion', which the CSV lacks")


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
# Journal (resume state)


@dataclass
class _ShardRecord:
    name: str
    count: int
    bytes: int
    sha256: str
    keys: list[str]
    last_index: int
    rejected: list[dict[str, Any]]


def _append_journal(out_dir: Path, record: dict[str, Any]) -> None:
    with open(out_dir / JOURNAL_NAME, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _load_journal(out_dir: Path, fingerprint: dict[str, Any]) -> list[_ShardRecord]:
    """Finished shards recorded by an earlier run, verified on disk; raises if that run used other options."""
    path = out_dir / JOURNAL_NAME
    if not path.is_file():
        return []
    records: list[_ShardRecord] = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for number, text in enumerate(lines, start=1):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("%s:%d: ignoring a torn journal line (killed mid-write)", path, number)
            break
        if record["type"] == "config" and record["config"] != fingerprint:
            differing = sorted(k for k in fingerprint if record["config"].get(k) != fingerprint[k])
            raise ValueError(
                f"{out_dir}: holds a build with different options (differs in {differing}); "
                "pass --overwrite to rebuild or choose another --out"
            )
        if record["type"] == "shard":
            shard = _ShardRecord(**{k: v for k, v in record.items() if k != "type"})
            shard_path = out_dir / shard.name
            if not shard_path.is_file() or shard_path.stat().st_size != shard.bytes:
                logger.warning(
                    "%s: missing or changed since the journal recorded it; rebuilding from here", shard_path
                )
                break
            records.append(shard)
    return records


def _clean_outputs(out_dir: Path, keep: set[str]) -> None:
    """Delete partial ``.tmp`` shards and shards not recorded as finished (left by a killed run)."""
    for path in out_dir.iterdir():
        if path.name.endswith(".tar.tmp") or (path.name.endswith(".tar") and path.name not in keep):
            path.unlink()


# ---------------------------------------------------------------------------------------------------------------------
# Shard writing


class _ShardSink:
    """Writes samples into ``{shard:06d}.tar.tmp`` and renames each shard into place when it is full."""

    def __init__(self, config: BuildConfig, out_dir: Path, first_shard: int) -> None:
        self.config = config
        self.out_dir = out_dir
        self.shard = first_shard
        self.writer: wds.TarWriter | None = None
        self.keys: list[str] = []
        self.bytes = 0
        self.pending_rejections: list[Rejection] = []
        self.last_index = -1
        self.finished: list[_ShardRecord] = []

    @property
    def _tmp_path(self) -> Path:
        return self.out_dir / (SHARD_PATTERN.format(shard=self.shard) + ".tmp")

    def write(self, row: CsvRow, sample: dict[str, Any], size: int) -> None:
        limit = self.config.shard_max_bytes
        if self.writer is not None and limit is not None and self.bytes + size > limit:
            self.finish()
        if self.writer is None:
            self.writer = wds.TarWriter(str(self._tmp_path), mtime=_TAR_MTIME)
            self.keys, self.bytes = [], 0
        self.writer.write(sample)
        self.keys.append(row.key)
        self.bytes += size
        self.last_index = row.index
        if len(self.keys) >= self.config.shard_max_count:
            self.finish()

    def reject(self, rejection: Rejection) -> None:
        self.pending_rejections.append(rejection)

    def finish(self) -> None:
        """Close, fsync and rename the open shard, then journal it (only a journaled shard counts as finished)."""
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        tmp_path = self._tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        final = self.out_dir / SHARD_PATTERN.format(shard=self.shard)
        os.replace(tmp_path, final)
        record = _ShardRecord(
            name=final.name,
            count=len(self.keys),
            bytes=final.stat().st_size,
            sha256=_sha256_file(final),
            keys=self.keys,
            last_index=self.last_index,
            rejected=[dataclasses.asdict(r) for r in self.pending_rejections],
        )
        _append_journal(self.out_dir, {"type": "shard", **dataclasses.asdict(record)})
        self.finished.append(record)
        self.pending_rejections = []
        self.shard += 1


def _sample(row: CsvRow, info: dict[str, Any], mp4: bytes) -> dict[str, Any]:
    metadata = {**row.values, **info, "csv_line": row.line, "schema_version": SCHEMA_VERSION}
    return {"__key__": row.key, "mp4": mp4, "txt": row.values["caption"], "json": metadata}


def _ordered(results: Iterator[ProbeResult], order: list[int]) -> Iterator[ProbeResult]:
    """Re-order unordered probe results into ``order`` (CSV order), so shard contents do not depend on timing."""
    buffer: dict[int, ProbeResult] = {}
    position = 0
    for result in results:
        buffer[result.index] = result
        while position < len(order) and order[position] in buffer:
            yield buffer.pop(order[position])
            position += 1


def build_shards(config: BuildConfig, overwrite: bool = False, progress: bool = True) -> BuildReport:
    """Build (or resume building) the shards described by ``config``; returns the report also saved as manifest."""
    out_dir = Path(config.out_dir)
    # Read the CSV first: a schema error must not leave an output folder or a journal behind.
    rows, rejected = read_csv_rows(config)
    fingerprint = config.fingerprint()
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in (JOURNAL_NAME, MANIFEST_NAME, REJECTED_NAME):
            (out_dir / name).unlink(missing_ok=True)
        _clean_outputs(out_dir, keep=set())
    finished = _load_journal(out_dir, fingerprint)
    _clean_outputs(out_dir, keep={record.name for record in finished})
    if not finished:
        (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
        _append_journal(out_dir, {"type": "config", "config": fingerprint})

    resume_index = finished[-1].last_index if finished else -1
    done_keys = {key for record in finished for key in record.keys}
    todo = [row for row in rows if row.index > resume_index and row.key not in done_keys]
    by_index = {row.index: row for row in todo}
    if finished:
        logger.info("resuming %s: %d finished shards kept, %d rows left", out_dir, len(finished), len(todo))

    sink = _ShardSink(config, out_dir, first_shard=len(finished))
    requests = (
        ProbeRequest(row.index, row.location, row.values.get("frame"), config.frame_tolerance, mode=config.probe_mode)
        for row in todo
    )
    pool = ProbePool(config.num_workers, config.probe_timeout_s, config.probe_fn)
    counts = {"ok": sum(record.count for record in finished), "rejected": 0}
    bar = tqdm(total=len(todo), desc=f"shards -> {out_dir}", unit="video", disable=not progress, file=sys.stderr)
    try:
        for result in _ordered(pool.imap_unordered(requests), [row.index for row in todo]):
            row = by_index[result.index]
            reason = result.reason if not result.ok else _probe_filter_reason(config, result.info)
            if reason:
                stage = "probe" if not result.ok else "filter"
                sink.reject(Rejection(row.line, row.values["video"], stage, reason))
                logger.info("%s:%d: rejected %s: %s", config.csv_path, row.line, row.values["video"], reason)
                counts["rejected"] += 1
            else:
                try:
                    mp4 = read_video_bytes(row.location)
                except OSError as error:
                    sink.reject(Rejection(row.line, row.values["video"], "file", f"read failed after probe: {error}"))
                    counts["rejected"] += 1
                else:
                    sink.write(row, _sample(row, result.info, mp4), len(mp4))
                    counts["ok"] += 1
            bar.update(1)
            bar.set_postfix(counts, refresh=False)
        sink.finish()
    finally:
        bar.close()
        pool.close()

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
    )
    _write_manifest(config, fingerprint, report, records, num_rows=len(rows) + len(rejected))
    return report


def _write_manifest(
    config: BuildConfig,
    fingerprint: dict[str, Any],
    report: BuildReport,
    records: list[_ShardRecord],
    num_rows: int,
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
    tmp = report.out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, report.out_dir / MANIFEST_NAME)
    with open(report.out_dir / REJECTED_NAME, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", "video", "stage", "reason"])
        writer.writerows((r.line, r.video, r.stage, r.reason) for r in report.rejected)


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a shard folder; raises FileNotFoundError naming the folder when there is none."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir}: no {MANIFEST_NAME}; build shards with `genvis-shards build` first")
    return json.loads(path.read_text(encoding="utf-8"))
