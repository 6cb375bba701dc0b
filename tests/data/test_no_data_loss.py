"""genvis-shards never destroys or silently drops data (issue 15): files it did not write, bad CSV cells, missing
decoders, odd paths, container formats, byte limits and Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest

from data_pipelines.build import (
    BuildConfig,
    BuildEnvironmentError,
    OutputConflictError,
    build_shards,
)
from data_pipelines.cli import main as cli_main
from data_pipelines.probe import ProbeRequest, VideoLocation, probe_video
from genvis.data.builtin import procedural_video
from genvis.data.loaders import ClipConfig, make_video_dataset
from genvis.data.schema import OPENVID_HEADER

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


def _config(csv_path: Path, videos: Path, out: Path, **options) -> BuildConfig:
    return BuildConfig(str(csv_path), str(videos), str(out), **options)


def _members(shard_dir: Path) -> list[str]:
    names = []
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as archive:
            names += archive.getnames()
    return names


def test_build_never_deletes_or_overwrites_files_it_did_not_write(
    procedural_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path, videos = procedural_root / "openvid.csv", procedural_root / "videos"
    out = tmp_path / "shards"
    out.mkdir()
    theirs = {"my_other_dataset-000000.tar": b"someone else's shard", "notes.txt": b"keep me", "12.tar": b"x"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    report = build_shards(_config(csv_path, videos, out, shard_max_count=4), progress=False)
    assert report.num_samples == 6
    build_shards(_config(csv_path, videos, out, shard_max_count=4), overwrite=True, progress=False)
    assert {name: (out / name).read_bytes() for name in theirs} == theirs

    # A file under an output name the build did not write: refused, named, untouched; --overwrite does not help.
    stray_dir = tmp_path / "stray"
    stray_dir.mkdir()
    (stray_dir / "000000.tar").write_bytes(b"not ours")
    for overwrite in (False, True):
        with pytest.raises(OutputConflictError, match=re.escape(str(stray_dir / "000000.tar"))):
            build_shards(_config(csv_path, videos, stray_dir), overwrite=overwrite, progress=False)
    assert (stray_dir / "000000.tar").read_bytes() == b"not ours"
    assert sorted(os.listdir(stray_dir)) == ["000000.tar"]
    argv = ["build", "--no-progress", "--csv", str(csv_path), "--video-root", str(videos), "--out", str(stray_dir)]
    assert cli_main(argv) == 2
    assert "000000.tar" in capsys.readouterr().err

    # A shard of our own build that someone changed afterwards is theirs now: refused, not rebuilt over.
    with open(out / "000001.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(OutputConflictError, match=r"000001\.tar \(journal: \d+ bytes"):
        build_shards(_config(csv_path, videos, out, shard_max_count=4), progress=False)
    assert (out / "000001.tar").stat().st_size % 10240 == 512


def test_bad_csv_cells_are_rejected_by_line_and_the_build_goes_on(procedural_root: Path, tmp_path: Path) -> None:
    rows = _rows(procedural_root)
    bad = [
        {**rows[0], "video": "nul\x00byte.mp4"},
        {**rows[0], "video": "x" * 300 + ".mp4"},
        {**rows[0], "video": "cafe.mp4", "caption": "CAFE_PLACEHOLDER"},
    ]
    nan_row = {**rows[5], "motion score": "NaN"}  # pandas' missing value; no filter reads it
    csv_path = _write_csv(tmp_path / "openvid.csv", rows[:2] + bad + rows[2:5] + [nan_row])
    # One row written by a cp1252 editor into the UTF-8 file.
    data = csv_path.read_bytes().replace(b"CAFE_PLACEHOLDER", "un caf\u00e9 cr\u00e8me".encode("cp1252"))
    csv_path.write_bytes(data)
    report = build_shards(_config(csv_path, procedural_root / "videos", tmp_path / "out"), progress=False)
    assert report.num_samples == 6
    reasons = {rejection.line: (rejection.stage, rejection.reason) for rejection in report.rejected}
    assert sorted(reasons) == [4, 5, 6]
    assert reasons[4][0] == "file" and "NUL byte at character 3" in reasons[4][1]
    assert "file name of 304 bytes, expected at most 255" in reasons[5][1]
    assert reasons[6][0] == "csv"
    assert "column 'caption': expected UTF-8 text, got byte 0xe9" in reasons[6][1]
    assert "'un café crème'" in reasons[6][1]  # what the row says when read as cp1252
    manifest = json.loads(report.manifest_path.read_text())
    assert manifest["num_rejected"] == 3
    with open(tmp_path / "out" / "rejected.csv", newline="", encoding="utf-8") as handle:
        assert [row["line"] for row in csv.DictReader(handle)] == ["4", "5", "6"]


NO_DECODER_HOOKS = """
import sys

from data_pipelines.probe import probe_video


def no_decord_probe(request):
    sys.modules["decord"] = None  # as on aarch64 / macOS, where decord has no wheels
    sys.modules["torchcodec"] = None  # and no torchcodec: auto falls through to PyAV
    return probe_video(request)


def no_decoder_probe(request):
    sys.modules["decord"] = None
    sys.modules["torchcodec"] = None
    sys.modules["av"] = None
    return probe_video(request)
"""


def test_without_decord_pyav_probes_and_without_any_decoder_the_build_fails(
    procedural_root: Path, probe_hooks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (probe_hooks / "decoder_hooks.py").write_text(NO_DECODER_HOOKS)
    csv_path, videos = procedural_root / "openvid.csv", procedural_root / "videos"
    reference = build_shards(_config(csv_path, videos, tmp_path / "decord"), progress=False)
    fallback = build_shards(
        _config(csv_path, videos, tmp_path / "pyav", probe_fn="decoder_hooks:no_decord_probe"), progress=False
    )
    assert fallback.num_samples == reference.num_samples == 6 and not fallback.rejected
    assert _members(tmp_path / "pyav") == _members(tmp_path / "decord")

    out = tmp_path / "none"
    with pytest.raises(
        BuildEnvironmentError,
        match="no video decoder: decord is not installed, torchcodec is not installed, pyav is not installed",
    ):
        build_shards(_config(csv_path, videos, out, probe_fn="decoder_hooks:no_decoder_probe"), progress=False)
    assert not (out / "manifest.json").exists()  # not a 0-sample dataset
    argv = ["build", "--no-progress", "--csv", str(csv_path), "--video-root", str(videos), "--out", str(out)]
    assert cli_main([*argv, "--probe-fn", "decoder_hooks:no_decoder_probe"]) == 1
    assert "failed for a reason of this machine, not of the video" in capsys.readouterr().err


def _encode(path: Path, container: str, codec: str, num_frames: int = 9) -> None:
    import av

    frames = procedural_video(4, num_frames=num_frames, size=32).frames
    with av.open(str(path), mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for array in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        output.mux(stream.encode())


def test_odd_paths_duplicates_and_container_formats(procedural_root: Path, tmp_path: Path) -> None:
    """FIFO / directory named .mp4, symlinked folders, one file under two spellings, webm/mkv/avi members."""
    rows = _rows(procedural_root)
    root = tmp_path / "videos"
    shutil.copytree(procedural_root / "videos", root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _encode(elsewhere / "vp9.webm", "webm", "libvpx-vp9")
    _encode(elsewhere / "h264.mkv", "matroska", "libx264")
    _encode(elsewhere / "mpeg4.avi", "avi", "mpeg4")
    shutil.copyfile(elsewhere / "h264.mkv", root / "mislabelled.mp4")  # mkv bytes under an .mp4 name
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # a symlinked video folder
    os.mkfifo(root / "pipe.mp4")
    (root / "folder.mp4").mkdir()
    extra = [
        {**rows[0], "video": "./proc_00000.mp4"},  # the same file as line 2
        {**rows[0], "video": "pipe.mp4"},
        {**rows[0], "video": "folder.mp4"},
        *({**rows[0], "video": f"linked/{name}", "frame": "9"} for name in ("vp9.webm", "h264.mkv", "mpeg4.avi")),
        {**rows[0], "video": "mislabelled.mp4", "frame": "9"},
        {**rows[0], "video": "../proc_00000.mp4"},
    ]
    csv_path = _write_csv(tmp_path / "openvid.csv", rows + extra)
    report = build_shards(_config(csv_path, root, tmp_path / "out", probe_timeout_s=30), progress=False)
    reasons = {rejection.line: rejection.reason for rejection in report.rejected}
    assert sorted(reasons) == [8, 9, 10, 15]
    assert reasons[8].startswith("duplicate video './proc_00000.mp4': the same file as line 2")
    assert reasons[9].endswith("pipe.mp4 is a FIFO (named pipe), expected a regular video file")
    assert reasons[10].endswith("folder.mp4 is a directory, expected a regular video file")
    assert "escapes --video-root" in reasons[15]
    members = _members(tmp_path / "out")
    assert {"vp9.webm", "h264.mkv", "mpeg4.avi", "mislabelled.mkv"} <= set(members)
    assert "mislabelled.mp4" not in members and sum(name.endswith(".mp4") for name in members) == 6


def test_max_size_bounds_the_whole_shard_file(procedural_root: Path, tmp_path: Path) -> None:
    limit = 20 * 1024  # a tar file is a whole number of 10 KiB records; the six samples take ~28 KiB
    config = _config(procedural_root / "openvid.csv", procedural_root / "videos", tmp_path / "out")
    config.shard_max_bytes = limit
    report = build_shards(config, progress=False)
    sizes = [(tmp_path / "out" / name).stat().st_size for name in report.shards]
    assert report.num_samples == 6 and len(sizes) > 1
    assert all(size <= limit for size in sizes), sizes
    assert report.total_bytes == sum(sizes)


def test_rejection_reasons_are_stable_and_decord_noise_stays_out_of_stderr(
    procedural_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    videos = tmp_path / "videos"
    shutil.copytree(procedural_root / "videos", videos)
    (videos / "notes.mp4").write_bytes(b"this is a text file, not a video\n" * 20)
    good = (videos / "proc_00000.mp4").read_bytes()
    (videos / "cut.mp4").write_bytes(good[: len(good) // 2])
    rows = _rows(procedural_root)
    bad_rows = [{**rows[0], "video": "notes.mp4"}, {**rows[0], "video": "cut.mp4"}]
    csv_path = _write_csv(tmp_path / "openvid.csv", rows + bad_rows)
    manifests = []
    for name in ("a", "b"):
        report = build_shards(_config(csv_path, videos, tmp_path / name), progress=False)
        manifests.append(json.loads(report.manifest_path.read_text())["rejected"])
        time.sleep(1.1)  # the clock stamps decord puts in its errors would now differ
    assert manifests[0] == manifests[1] and len(manifests[0]) == 2
    for entry in manifests[0]:
        assert not re.search(r"\d\d:\d\d:\d\d|0x[0-9a-f]{6,}|\.cc:\d+", entry["reason"]), entry["reason"]
    assert "this is a text file" not in capfd.readouterr().err


def test_ctrl_c_stops_the_build_without_a_traceback(procedural_root: Path, probe_hooks: Path, tmp_path: Path) -> None:
    csv_path, videos = procedural_root / "openvid.csv", procedural_root / "videos"
    out = tmp_path / "shards"
    command = [
        *(sys.executable, "-m", "data_pipelines.cli", "build", "--no-progress"),
        *("--csv", str(csv_path), "--video-root", str(videos), "--out", str(out), "--max-count", "2"),
        *("--workers", "1", "--probe-fn", "probe_hooks:slow_probe"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe_hooks), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "000000.tar").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "first shard never appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "re-run the same command to resume" in stderr
    report = build_shards(_config(csv_path, videos, out, shard_max_count=2), progress=False)
    assert report.resumed_shards >= 1 and report.num_samples == 6


def test_verify_reports_every_damaged_shard(
    procedural_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    build_shards(
        _config(procedural_root / "openvid.csv", procedural_root / "videos", out, shard_max_count=2), progress=False
    )
    assert cli_main(["verify", str(out)]) == 0
    capsys.readouterr()
    first = (out / "000000.tar").read_bytes()
    (out / "000000.tar").write_bytes(first[: len(first) // 3])  # truncated inside a member
    second = bytearray((out / "000001.tar").read_bytes())
    second[3] ^= 0x10  # a bit flip in the first tar header's name field: its checksum no longer matches
    (out / "000001.tar").write_bytes(bytes(second))
    third = bytearray((out / "000002.tar").read_bytes())
    with tarfile.open(out / "000002.tar") as archive:
        offset = archive.getmembers()[3].offset  # header of the second sample's first member
    third[offset + 1] ^= 0x01
    (out / "000002.tar").write_bytes(bytes(third))

    assert cli_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "3 of 3 shards damaged (000000.tar, 000001.tar, 000002.tar)" in err
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert re.search(rf"{name}: sha256 expected [0-9a-f]{{64}}, got [0-9a-f]{{64}}", err), name
    assert re.search(r"000000\.tar: (unreadable tar|expected 2 samples, got [01])", err)
    assert "000002.tar: expected 2 samples, got 1" in err
    assert "Traceback" not in err


def _padded_mp4(source: Path, target: Path, padding: int) -> None:
    """A valid mp4 made ``padding`` bytes larger by a trailing ISO-BMFF ``free`` box (decoders skip it)."""
    with open(target, "wb") as handle:
        handle.write(source.read_bytes())
        handle.write((padding + 8).to_bytes(4, "big") + b"free")
        handle.truncate(handle.tell() + padding)


def _traced_peak(function) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_probe_build_and_loader_do_not_read_whole_videos(procedural_root: Path, tmp_path: Path) -> None:
    """Python-side peak allocation stays far below a 24 MiB video in the probe, the shard writer and the loader
    (``benchmarks/data_memory.py`` measures process RSS for 64 MiB vs 1 GiB files)."""
    size = 24 << 20
    videos = tmp_path / "videos"
    videos.mkdir()
    _padded_mp4(procedural_root / "videos" / "proc_00000.mp4", videos / "big.mp4", size)
    rows = _rows(procedural_root)
    csv_path = _write_csv(tmp_path / "openvid.csv", [{**rows[0], "video": "big.mp4"}])

    result, peak = _traced_peak(lambda: probe_video(ProbeRequest(0, VideoLocation(str(videos / "big.mp4")))))
    assert result.ok and result.info["probed_frames"] == 9, result
    assert peak < size // 8, f"probe peak {peak / 2**20:.1f} MiB for a {size >> 20} MiB file"

    with zipfile.ZipFile(tmp_path / "videos.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        archive.write(videos / "big.mp4", "big.mp4")
    location = VideoLocation(str(tmp_path / "videos.zip"), "big.mp4")
    result, peak = _traced_peak(lambda: probe_video(ProbeRequest(0, location)))
    assert result.ok and peak < size // 8, f"zip member probe peak {peak / 2**20:.1f} MiB"

    out = tmp_path / "out"
    report, peak = _traced_peak(lambda: build_shards(_config(csv_path, videos, out), progress=False))
    assert report.num_samples == 1 and peak < size // 8, f"build peak {peak / 2**20:.1f} MiB"

    clip = ClipConfig(num_frames=4, frame_stride=2, resolution_buckets=[(16, 16)])
    dataset = make_video_dataset(out, clip, batch_size=1, resampled=False, shuffle_buffer=4)
    batches, peak = _traced_peak(lambda: list(dataset))
    assert [batch["__key__"] for batch in batches] == [["big"]]
    assert peak < size // 8, f"loader peak {peak / 2**20:.1f} MiB"
