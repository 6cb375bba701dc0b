"""genvis-shards build: good samples kept, every kind of bad file/row rejected with its reason, resume after a kill."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipelines.build import BuildConfig, CsvSchemaError, build_shards
from data_pipelines.cli import main as cli_main
from genvis.data.builtin import procedural_video
from genvis.data.schema import JOURNAL_NAME, OPENVID_HEADER
from genvis.data.video import encode_mp4, write_mp4

GOOD = [f"proc_{i:05d}" for i in range(6)]


def _rows(procedural_root: Path) -> list[dict[str, str]]:
    with open(procedural_root / "openvid.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(OPENVID_HEADER))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def mixed_folder(procedural_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Good clips plus each kind of bad file, and a CSV naming all of them (good rows first, then bad ones)."""
    videos = tmp_path / "videos"
    shutil.copytree(procedural_root / "videos", videos)
    rows = _rows(procedural_root)
    template = dict(rows[0])
    good_bytes = (videos / "proc_00000.mp4").read_bytes()
    bad_files = {
        "zero_byte.mp4": b"",
        "truncated.mp4": good_bytes[: len(good_bytes) // 2],
        "random_bytes.mp4": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "notes.mp4": b"this is a text file, not a video\n" * 20,
        "one_frame.mp4": encode_mp4(procedural_video(1, num_frames=2, size=32).frames[:1]),
    }
    for name, data in bad_files.items():
        (videos / name).write_bytes(data)
    # A faststart mp4 cut short: the index promises 17 frames, decode fails or finds fewer.
    write_mp4(videos / "faststart_full.mp4", procedural_video(2, num_frames=17, size=32).frames, faststart=True)
    full = (videos / "faststart_full.mp4").read_bytes()
    (videos / "truncated_faststart.mp4").write_bytes(full[: int(len(full) * 0.6)])
    (videos / "faststart_full.mp4").unlink()
    bad_rows = [{**template, "video": name, "frame": "9"} for name in bad_files]
    bad_rows[-1]["frame"] = "1"
    bad_rows.append({**template, "video": "truncated_faststart.mp4", "frame": "17"})
    bad_rows.append({**template, "video": "does_not_exist.mp4"})
    bad_rows.append({**template, "video": "bad_number.mp4", "motion score": "fast"})
    bad_rows.append({**template, "video": "empty_caption.mp4", "caption": ""})
    csv_path = _write_csv(tmp_path / "openvid.csv", rows + bad_rows)
    with open(csv_path, "a", newline="") as handle:
        handle.write("short_row.mp4,only two fields\n")
    return csv_path, videos


def _keys_in(shard_dir: Path) -> list[str]:
    urls = sorted(str(path) for path in shard_dir.glob("*.tar"))
    return [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def _digests(shard_dir: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(shard_dir.glob("*.tar"))}


def test_build_keeps_exactly_the_good_videos(mixed_folder: tuple[Path, Path], tmp_path: Path) -> None:
    csv_path, videos = mixed_folder
    out = tmp_path / "shards"
    config = BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=4, probe_timeout_s=30)
    report = build_shards(config, progress=False)

    # Read back with plain webdataset: exactly the good keys, in CSV order, every member present.
    assert _keys_in(out) == GOOD
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False, empty_check=False))
    for sample in samples:
        metadata = json.loads(sample["json"])
        assert sample["txt"].decode() == metadata["caption"]
        assert (metadata["width"], metadata["height"], metadata["probed_frames"]) == (32, 32, 9)
        assert metadata["probed_fps"] == pytest.approx(8.0)
        assert {"aesthetic_score", "motion_score", "temporal_consistency_score", "camera_motion", "seconds"} <= set(
            metadata
        )
        assert sample["mp4"] == (videos / metadata["video"]).read_bytes()
    # Read back with tar: the webdataset member layout {key}.{mp4,txt,json} and the {shard:06d}.tar names.
    assert sorted(path.name for path in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    listing = subprocess.run(["tar", "-tf", str(out / "000000.tar")], capture_output=True, text=True, check=True)
    assert listing.stdout.split()[:3] == ["proc_00000.json", "proc_00000.mp4", "proc_00000.txt"]

    # Every bad row is in the manifest with its CSV line and a reason naming what was wrong.
    manifest = json.loads(report.manifest_path.read_text())
    reasons = {entry["video"]: (entry["line"], entry["stage"], entry["reason"]) for entry in manifest["rejected"]}
    assert manifest["num_samples"] == 6 and manifest["num_rejected"] == len(reasons) == 10
    assert reasons["zero_byte.mp4"][2] == "empty file (0 bytes)"
    for name in ("truncated.mp4", "random_bytes.mp4", "notes.mp4", "truncated_faststart.mp4"):
        assert reasons[name][1] == "probe", reasons[name]
    assert reasons["one_frame.mp4"][1:] == ("filter", "too short: 1 frames < min_frames 9")
    assert reasons["does_not_exist.mp4"][1] == "file" and "not found" in reasons["does_not_exist.mp4"][2]
    assert reasons["bad_number.mp4"] == (
        15,
        "csv",
        "column 'motion score': expected a number, got 'fast'",
    )
    assert reasons["empty_caption.mp4"][0] == 16 and "'caption'" in reasons["empty_caption.mp4"][2]
    assert reasons["short_row.mp4"] == (17, "csv", "expected 9 fields (header of openvid.csv), got 2")
    assert [entry["line"] for entry in manifest["rejected"]] == sorted(entry[0] for entry in reasons.values())
    assert sum(entry["count"] for entry in manifest["shards"]) == 6
    assert (out / "rejected.csv").read_text().count("\n") == 11


def test_hanging_and_crashing_probes_are_killed_and_recorded(
    procedural_root: Path, probe_hooks: Path, tmp_path: Path
) -> None:
    videos = tmp_path / "videos"
    shutil.copytree(procedural_root / "videos", videos)
    rows = _rows(procedural_root)
    shutil.copyfile(videos / "proc_00001.mp4", videos / "hang.mp4")
    shutil.copyfile(videos / "proc_00002.mp4", videos / "abort.mp4")
    rows.insert(2, {**rows[1], "video": "hang.mp4"})
    rows.insert(4, {**rows[2], "video": "abort.mp4"})
    csv_path = _write_csv(tmp_path / "openvid.csv", rows)
    config = BuildConfig(
        str(csv_path),
        str(videos),
        str(tmp_path / "shards"),
        shard_max_count=2,
        probe_timeout_s=3,
        probe_fn="probe_hooks:misbehaving_probe",
    )
    start = time.monotonic()
    report = build_shards(config, progress=False)
    assert time.monotonic() - start < 60
    assert _keys_in(tmp_path / "shards") == GOOD
    reasons = {rejection.video: rejection.reason for rejection in report.rejected}
    assert set(reasons) == {"hang.mp4", "abort.mp4"}
    assert reasons["hang.mp4"].startswith("probe timed out after 3 s")
    assert reasons["abort.mp4"] == "probe process crashed (killed by signal SIGABRT)"


def test_zip_layout_and_filters(procedural_root: Path, tmp_path: Path) -> None:
    """zip_file + video_path columns (the community mapping layout), score/camera filters and byte-sized shards."""
    rows = _rows(procedural_root)
    zips = tmp_path / "zips"
    zips.mkdir()
    with zipfile.ZipFile(zips / "OpenVid_part0.zip", "w") as archive:
        for row in rows:
            archive.write(procedural_root / "videos" / row["video"], f"video/{row['video']}")
    mapped = [{**row, "zip_file": "OpenVid_part0.zip", "video_path": f"video/{row['video']}"} for row in rows]
    csv_path = tmp_path / "mapping.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*OPENVID_HEADER, "zip_file", "video_path"])
        writer.writeheader()
        writer.writerows(mapped)
    threshold = sorted(float(row["motion score"]) for row in rows)[2]
    config = BuildConfig(
        str(csv_path),
        str(zips),
        str(tmp_path / "shards"),
        shard_max_count=100,
        shard_max_bytes=1,  # one sample per shard: a single sample larger than the limit still gets its own shard
        ranges={"motion_score": (threshold, None), "width": (None, 32)},
        exclude_camera_motion=["pan_left"],
    )
    report = build_shards(config, progress=False)
    expected = [
        row["video"][:-4]
        for row in rows
        if float(row["motion score"]) >= threshold and row["camera motion"] != "pan_left"
    ]
    assert 0 < len(expected) < len(rows)
    assert _keys_in(tmp_path / "shards") == expected
    assert len(report.shards) == len(expected)
    assert all(rejection.stage == "filter" for rejection in report.rejected)
    # The same zip read directly as --video-root (inner paths found by basename).
    direct = BuildConfig(str(procedural_root / "openvid.csv"), str(zips / "OpenVid_part0.zip"), str(tmp_path / "z"))
    assert build_shards(direct, progress=False).num_samples == len(rows)


def test_csv_schema_errors_name_file_and_columns(tmp_path: Path) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("clip,aesthetic score\na.mp4,5.0\n")
    with pytest.raises(CsvSchemaError, match=r"bad\.csv:1: missing required column\(s\) \['video', 'caption'\]"):
        build_shards(BuildConfig(str(csv_path), str(tmp_path), str(tmp_path / "out")), progress=False)
    csv_path.write_text("video,caption\na.mp4,hello\n")
    config = BuildConfig(str(csv_path), str(tmp_path), str(tmp_path / "out"), ranges={"aesthetic_score": (5.0, None)})
    with pytest.raises(CsvSchemaError, match="'aesthetic score', which the CSV lacks"):
        build_shards(config, progress=False)
    out = tmp_path / "never_created"
    assert cli_main(["build", "--csv", str(tmp_path / "nope.csv"), "--video-root", ".", "--out", str(out)]) == 2
    assert not out.exists()


def test_cli_help_lists_filters(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["build", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--min-aesthetic", "--max-motion", "--min-temporal-consistency", "--min-seconds", "--max-fps"):
        assert option in text
    for option in ("--min-width", "--min-frames", "--max-size", "--max-count", "--workers", "--probe-timeout"):
        assert option in text


def test_resume_after_kill_keeps_finished_shards(procedural_root: Path, probe_hooks: Path, tmp_path: Path) -> None:
    csv_path, videos = procedural_root / "openvid.csv", procedural_root / "videos"
    reference = tmp_path / "reference"
    build_shards(BuildConfig(str(csv_path), str(videos), str(reference), shard_max_count=2), progress=False)

    out = tmp_path / "shards"
    command = [
        *(sys.executable, "-m", "data_pipelines.cli", "build", "--no-progress"),
        *("--csv", str(csv_path), "--video-root", str(videos), "--out", str(out), "--max-count", "2"),
        *("--workers", "1", "--probe-fn", "probe_hooks:slow_probe"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe_hooks), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    # Kill once the first shard is journaled (the file is renamed into place just before its journal line).
    while not ((out / JOURNAL_NAME).is_file() and '"type": "shard"' in (out / JOURNAL_NAME).read_text()):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "first shard never appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the builder and its probe workers, mid-build
    process.wait()
    first = (out / "000000.tar").stat()
    assert not (out / "000002.tar").exists(), "build finished before the kill; the test proves nothing"
    assert (out / JOURNAL_NAME).is_file()

    report = build_shards(BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=2), progress=False)
    assert report.resumed_shards >= 1
    assert (out / "000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    assert (out / "000000.tar").stat().st_ino == first.st_ino
    assert _keys_in(out) == GOOD
    assert _digests(out) == _digests(reference)  # identical to an uninterrupted build
    assert not list(out.glob("*.tmp"))
    # A re-run with other options refuses to mix builds.
    with pytest.raises(ValueError, match="different options"):
        build_shards(BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=3), progress=False)


def test_shards_are_plain_tar_files(procedural_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    build_shards(
        BuildConfig(str(procedural_root / "openvid.csv"), str(procedural_root / "videos"), str(out)),
        progress=False,
    )
    with tarfile.open(out / "000000.tar") as archive:
        names = archive.getnames()
    assert names == [f"{key}.{ext}" for key in GOOD for ext in ("json", "mp4", "txt")]
    assert cli_main(["verify", str(out), "--decode"]) == 0
