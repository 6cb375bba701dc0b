"""Row files for ``genvis-shards build``: CSV, TSV, JSONL and parquet, each read as a header and one list of string
cells per row, so every format goes through the same checks (``data_pipelines.build``) and a bad row is rejected by
its line while the build goes on.

- **CSV** / **TSV**: the first line is the header; ``line`` is the file line the record starts on (the header is line
  1). TSV is read as CSV with a tab delimiter (quoted fields allowed, as pandas writes them).
- **JSONL** (``.jsonl``, ``.ndjson``): one JSON object per line; the columns are every key seen in the file, in
  first-seen order; a key a row lacks is an empty cell. ``line`` is the file line (no header line). A line that is not
  valid JSON, or not an object, is a bad row.
- **parquet** (``.parquet``, ``.pq``; needs ``pyarrow``): the columns are the schema's; rows are read in batches (memory
  does not grow with the file); ``line`` is the 1-based row number.

Values become cells as text: null is empty, numbers as written (NaN is a missing value, as in the CSV), nested
objects/lists as JSON. The format comes from the extension; ``--format`` overrides it. The file may be an fsspec URL
(``data_pipelines.remote``); it is streamed, never read whole.
Checked by ``tests/data/test_row_formats.py``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from data_pipelines import remote

ROW_FORMATS = ("csv", "tsv", "jsonl", "parquet")
FORMAT_BY_EXTENSION = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_PARQUET_BATCH_ROWS = 4096


class CsvSchemaError(ValueError):
    """The row file cannot be used at all (unreadable, unknown format, or a required column is missing)."""


@dataclass(frozen=True)
class RowRecord:
    """One row: its ``line`` (see the module docstring) and its cells, or why it could not be read at all."""

    line: int
    cells: list[str] | None
    error: str | None = None


@dataclass
class RowFile:
    """An open row file.

    Args:
        path: the file's path or URL.
        format: ``csv``, ``tsv``, ``jsonl`` or ``parquet``.
        header: column names, in cell order.
        where: prefix naming the header in messages (``file:1`` for CSV/TSV, the file for JSONL/parquet).
        records: the rows, blank lines skipped.
    """

    path: str
    format: str
    header: list[str]
    where: str
    records: Iterator[RowRecord]

    @property
    def name(self) -> str:
        """The file's base name."""
        return _base_name(self.path)


def _base_name(path: str) -> str:
    if remote.is_url(path):
        return PurePosixPath(urllib.parse.urlsplit(path).path).name
    return Path(remote.local_path(path)).name


def detect_row_format(path: str | Path, requested: str = "auto") -> str:
    """The row format of ``path``: ``requested`` when not ``auto``, else from the file extension.

    Raises:
        CsvSchemaError: ``requested`` is unknown, or ``auto`` and the extension names no row format.
    """
    if requested != "auto":
        if requested not in ROW_FORMATS:
            raise CsvSchemaError(f"row format: expected one of {['auto', *ROW_FORMATS]}, got {requested!r}")
        return requested
    suffix = PurePosixPath(_base_name(str(path))).suffix.lower()
    if suffix in FORMAT_BY_EXTENSION:
        return FORMAT_BY_EXTENSION[suffix]
    raise CsvSchemaError(
        f"{path}: cannot tell the row format from the extension {suffix or '(none)'!r}; expected one of "
        f"{sorted(FORMAT_BY_EXTENSION)}, or name it with --format {{{','.join(ROW_FORMATS)}}}"
    )


def cell_text(value: Any) -> str:
    """A JSON / parquet value as a cell: null -> '', numbers as text, bytes as UTF-8 (bad bytes kept for the
    row check to name), nested values as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


@contextlib.contextmanager
def open_rows(path: str | Path, requested: str = "auto") -> Iterator[RowFile]:
    """Open a row file for one pass over its rows.

    Raises:
        CsvSchemaError: not found, unknown format, empty (CSV/TSV), unreadable header, not a parquet file, or
            parquet without ``pyarrow``.
    """
    path = str(path)
    row_format = detect_row_format(path, requested)
    if remote.is_url(path):
        try:
            found = remote.kind(path)
        except remote.RemoteInputError as error:
            raise CsvSchemaError(str(error)) from error
        if found != "file":
            raise CsvSchemaError(
                f"{path}: {row_format.upper()} row file " + ("not found" if found is None else f"is a {found}")
            )
    elif not Path(remote.local_path(path)).is_file():
        raise CsvSchemaError(f"{path}: {row_format.upper()} row file not found")
    if row_format in ("csv", "tsv"):
        with _delimited(path, row_format) as rows:
            yield rows
    elif row_format == "jsonl":
        yield _jsonl(path)
    else:
        yield _parquet(path)


def _open_text(path: str) -> io.TextIOWrapper:
    """The file as text, streamed (surrogateescape: a row with non-UTF-8 bytes is rejected by line instead of
    aborting the whole read)."""
    binary, _ = remote.open_binary(path)
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")


@contextlib.contextmanager
def _delimited(path: str, row_format: str) -> Iterator[RowFile]:
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t" if row_format == "tsv" else ",")
        try:
            header = next(reader)
        except StopIteration:
            raise CsvSchemaError(f"{path}: empty file, expected an OpenVid-1M header line") from None
        except csv.Error as error:
            raise CsvSchemaError(f"{path}:1: unreadable header ({error})") from error

        def records() -> Iterator[RowRecord]:
            while True:
                line = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as error:
                    yield RowRecord(line, None, f"unparseable {row_format.upper()} record: {error}")
                    continue
                if cells and any(cell.strip() for cell in cells):  # blank lines are not rows
                    yield RowRecord(line, cells)

        yield RowFile(path, row_format, header, f"{path}:1", records())


def _jsonl_object(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON: {error.msg} at column {error.colno}, got {text.strip()[:60]!r}"
    if not isinstance(value, dict):
        return None, f"expected a JSON object per line, got a JSON {type(value).__name__}: {text.strip()[:60]!r}"
    return value, None


def _jsonl(path: str) -> RowFile:
    keys: dict[str, None] = {}
    with _open_text(path) as handle:
        for text in handle:  # first pass: the columns are every key seen, in first-seen order
            if text.strip():
                value, _ = _jsonl_object(text)
                keys.update(dict.fromkeys(value or {}))
    header = list(keys)

    def records() -> Iterator[RowRecord]:
        with _open_text(path) as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                value, error = _jsonl_object(text)
                if value is None:
                    yield RowRecord(line, None, error)
                else:
                    yield RowRecord(line, [cell_text(value.get(key)) for key in header])

    return RowFile(path, "jsonl", header, f"{path} (keys of all rows)", records())


def _parquet(path: str) -> RowFile:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as error:
        raise CsvSchemaError(
            f"{path}: reading parquet needs the 'pyarrow' package, which does not import ({error}); "
            "install it with `pip install pyarrow`, or convert the rows to CSV / JSONL"
        ) from error
    try:
        source = remote.open_binary(path, sequential=False)[0] if remote.is_url(path) else remote.local_path(path)
        table = pq.ParquetFile(source)
    except (pyarrow.ArrowException, OSError) as error:
        raise CsvSchemaError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from error
    header = list(table.schema_arrow.names)

    def records() -> Iterator[RowRecord]:
        row = 0
        try:
            for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for values in batch.to_pylist():
                    row += 1
                    yield RowRecord(row, [cell_text(values.get(key)) for key in header])
        except (pyarrow.ArrowException, OSError) as error:
            raise CsvSchemaError(
                f"{path}: parquet data unreadable after row {row} ({type(error).__name__}: {error})"
            ) from error
        finally:
            table.close()

    return RowFile(path, "parquet", header, f"{path} (parquet schema)", records())
