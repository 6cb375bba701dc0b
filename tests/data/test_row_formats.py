"""Row files for ``genvis-shards build`` (issue 15): CSV, TSV, JSONL and parquet, detected by extension or named with
``--format``; every format keeps the good rows and rejects each bad row by its line (parquet: row number) with the
column, the expected type and the value found, while the build goes on.

parquet needs ``pyarrow``, a dependency of the ``data`` extra (part of ``dev``): the parquet build always runs here,
and the error naming the package is tested by hiding it."""

from __future__ import annotations

import csv
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet as pq
import pytest

from data_pipelines.build import BuildConfig, CsvSchemaError, build_shards
from data_pipelines.cli import main as cli_main
from data_pipelines.rows import detect_row_format
from genvis.data.schema import OPENVID_HEADER

NUMBER_COLUMNS = {"aesthetic score", "motion score", "temporal consistency score", "fps", "seconds"}
INT_COLUMNS = {"frame"}


def _good_rows(procedural_root: Path) -> list[dict[str, str]]:
    with open(procedural_root / "openvid.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _rows_with_bad_ones(procedural_root: Path) -> list[dict[str, str]]:
    """The six good rows with a bad score (third row) and an empty caption (fifth row) among them."""
    good = _good_rows(procedural_root)
    bad_score = {**good[0], "video": "bad_score.mp4", "aesthetic score": "high"}
    bad_caption = {**good[1], "video": "bad_caption.mp4", "caption": ""}
    return [good[0], good[1], bad_score, good[2], bad_caption, good[3], good[4], good[5]]


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """A row as JSON would hold it: numbers as numbers (a cell that is not a number stays a string)."""
    typed: dict[str, Any] = {}
    for name, value in row.items():
        try:
            typed[name] = int(value) if name in INT_COLUMNS else float(value) if name in NUMBER_COLUMNS else value
        except ValueError:
            typed[name] = value
    return typed


def _build(rows_path: Path, procedural_root: Path, out: Path, **options: Any):
    config = BuildConfig(str(rows_path), str(procedural_root / "videos"), str(out), **options)
    return build_shards(config, progress=False)


def _samples(out: Path) -> dict[str, dict[str, Any]]:
    """key -> {caption, metadata} of every sample in the shards."""
    found: dict[str, dict[str, Any]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, ext = member.name.split(".", 1)
                data = archive.extractfile(member).read()
                entry = found.setdefault(key, {})
                if ext == "txt":
                    entry["caption"] = data.decode()
                elif ext == "json":
                    entry["metadata"] = json.loads(data)
    return found


def _check(report, out: Path, procedural_root: Path, expected_lines: list[int]) -> None:
    """Six samples with the CSV's captions and scores, recorded under their own lines."""
    good = _good_rows(procedural_root)
    assert report.num_samples == 6
    samples = _samples(out)
    assert sorted(samples) == [row["video"].removesuffix(".mp4") for row in good]
    for row, line in zip(good, expected_lines):
        sample = samples[row["video"].removesuffix(".mp4")]
        assert sample["caption"] == row["caption"]
        assert sample["metadata"]["aesthetic_score"] == pytest.approx(float(row["aesthetic score"]))
        assert sample["metadata"]["frame"] == int(row["frame"]) and sample["metadata"]["csv_line"] == line


def _rejections(report) -> list[tuple[int, str, str]]:
    return [(r.line, r.stage, r.reason) for r in report.rejected]


BAD_SCORE = "column 'aesthetic score': expected a number, got 'high'"
BAD_CAPTION = "column 'caption': expected a non-empty value, got ''"


@pytest.mark.parametrize("row_format", ["csv", "tsv"])
def test_csv_and_tsv_rows(row_format: str, procedural_root: Path, tmp_path: Path) -> None:
    rows_path = tmp_path / f"rows.{row_format}"
    with open(rows_path, "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(OPENVID_HEADER), delimiter="," if row_format == "csv" else "\t"
        )
        writer.writeheader()
        writer.writerows(_rows_with_bad_ones(procedural_root))
        handle.write("short.mp4" + ("," if row_format == "csv" else "\t") + "too few fields\n")
    report = _build(rows_path, procedural_root, tmp_path / "out")
    _check(report, tmp_path / "out", procedural_root, [2, 3, 5, 7, 8, 9])
    assert _rejections(report) == [
        (4, "csv", BAD_SCORE),
        (6, "csv", BAD_CAPTION),
        (10, "csv", f"expected 9 fields (header of rows.{row_format}), got 2"),
    ]
    # A TSV read as CSV (or the other way round) is one column: the error names the file and what was found.
    wrong = "csv" if row_format == "tsv" else "tsv"
    with pytest.raises(CsvSchemaError, match=rf"rows\.{row_format}:1: missing required column\(s\)"):
        _build(rows_path, procedural_root, tmp_path / "wrong", input_format=wrong)


def test_jsonl_rows(procedural_root: Path, tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.jsonl"
    lines = [json.dumps(_typed(row)) for row in _rows_with_bad_ones(procedural_root)]
    lines += [
        '{"video": "broken.mp4", "caption": ',  # line 9: cut mid-object
        '["list.mp4", "a list, not an object"]',  # line 10
        "",  # blank: not a row
        json.dumps({"video": "nested.mp4", "caption": "x", "frame": {"n": 9}}),  # line 12: an object in an int column
    ]
    latin1 = json.dumps(
        {**_good_rows(procedural_root)[0], "video": "latin1.mp4", "caption": "caf\u00e9"}, ensure_ascii=False
    )
    data = ("\n".join(lines) + "\n").encode() + latin1.encode().replace("\u00e9".encode(), b"\xe9") + b"\n"
    rows_path.write_bytes(data)  # line 13: one cp1252 byte in a UTF-8 file
    report = _build(rows_path, procedural_root, tmp_path / "out")
    _check(report, tmp_path / "out", procedural_root, [1, 2, 4, 6, 7, 8])
    rejected = _rejections(report)
    assert rejected[:2] == [(3, "csv", BAD_SCORE), (5, "csv", BAD_CAPTION)]
    assert rejected[2][:2] == (9, "csv") and rejected[2][2].startswith("invalid JSON: Expecting value at column")
    assert rejected[3] == (
        10,
        "csv",
        'expected a JSON object per line, got a JSON list: \'["list.mp4", "a list, not an object"]\'',
    )
    assert rejected[4] == (12, "csv", "column 'frame': expected a whole number, got '{\"n\": 9}'")
    assert rejected[5][:2] == (13, "csv") and "expected UTF-8 text, got byte 0xe9" in rejected[5][2]
    assert len(rejected) == 6
    # Keys follow the OpenVid spellings the CSV accepts (snake_case here); a file with no video key is refused.
    snake = tmp_path / "snake.ndjson"
    snake.write_text(json.dumps({"video": "proc_00000.mp4", "caption": "a clip", "aesthetic_score": 5.0}) + "\n")
    assert _build(snake, procedural_root, tmp_path / "snake", min_frames=1).num_samples == 1
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"file": "proc_00000.mp4"}\n')
    with pytest.raises(CsvSchemaError, match=r"keyless\.jsonl \(keys of all rows\): missing required column"):
        _build(keyless, procedural_root, tmp_path / "keyless")


def test_parquet_rows(procedural_root: Path, tmp_path: Path) -> None:
    rows = [_typed(row) for row in _rows_with_bad_ones(procedural_root)]
    rows[4]["caption"] = None  # the bad caption: a null
    rows[5]["motion score"] = float("nan")  # NaN is a missing value, not a bad row (no motion filter here)
    columns = {name: [row[name] for row in rows] for name in OPENVID_HEADER}
    columns["aesthetic score"] = [str(value) for value in columns["aesthetic score"]]  # a string column with "high"
    rows_path = tmp_path / "rows.parquet"
    pq.write_table(pyarrow.table(columns), rows_path, row_group_size=3)  # several row groups
    report = _build(rows_path, procedural_root, tmp_path / "out")
    _check(report, tmp_path / "out", procedural_root, [1, 2, 4, 6, 7, 8])
    assert _rejections(report) == [(3, "csv", BAD_SCORE), (5, "csv", BAD_CAPTION)]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["input_format"] == "parquet"
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("video,caption\n")
    with pytest.raises(CsvSchemaError, match=r"text\.parquet: not a readable parquet file"):
        _build(not_parquet, procedural_root, tmp_path / "bad")


def test_parquet_without_pyarrow_names_the_package(
    procedural_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rows_path = tmp_path / "rows.parquet"
    rows_path.write_bytes(b"PAR1")
    with pytest.raises(CsvSchemaError, match=r"reading parquet needs the 'pyarrow' package.*pip install pyarrow"):
        _build(rows_path, procedural_root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_format_from_extension_or_named(
    procedural_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert [detect_row_format(f"a.{ext}") for ext in ("csv", "TSV", "tab", "jsonl", "ndjson", "parquet", "pq")] == [
        "csv",
        "tsv",
        "tsv",
        "jsonl",
        "jsonl",
        "parquet",
        "parquet",
    ]
    rows_path = tmp_path / "rows.txt"
    rows_path.write_text("\n".join(json.dumps(_typed(row)) for row in _good_rows(procedural_root)) + "\n")
    argv = ["build", "--no-progress", "--rows", str(rows_path), "--video-root", str(procedural_root / "videos")]
    assert cli_main([*argv, "--out", str(tmp_path / "auto")]) == 2
    err = capsys.readouterr().err
    assert "rows.txt: cannot tell the row format from the extension '.txt'" in err and "--format" in err
    assert not (tmp_path / "auto").exists()
    assert cli_main([*argv, "--out", str(tmp_path / "named"), "--format", "jsonl"]) == 0
    assert "6 samples" in capsys.readouterr().out
    # A CSV build's resume fingerprint is what it was before formats existed; other formats record theirs.
    csv_config = BuildConfig(str(procedural_root / "openvid.csv"), str(procedural_root / "videos"), "x")
    assert "input_format" not in csv_config.fingerprint()
    jsonl_config = BuildConfig(str(rows_path), str(procedural_root / "videos"), "x", input_format="jsonl")
    assert jsonl_config.fingerprint()["input_format"] == "jsonl"
