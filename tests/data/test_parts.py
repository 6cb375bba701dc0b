"""``genvis-shards build --part I/N`` (issue 15): a slurm array splits one row file without Ray. Part I builds a
contiguous block of the records into the shared ``--out`` under names that carry the part, resumes on its own, and
``genvis-shards merge`` combines the part manifests; the union of the parts is the single-process build, sample for
sample and byte for byte, rejections included."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data_pipelines.build import BuildConfig, OutputConflictError, build_shards, parse_part, part_bounds
from data_pipelines.cli import main as cli_main
from data_pipelines.parts import MergeError, merge_parts
from data_pipelines.verify import verify_shards
from genvis.data.loaders import resolve_shards
from genvis.data.schema import MANIFEST_NAME, OPENVID_HEADER


def _write_csv(path: Path, rows: list[dict[str, str]], extra_lines: str = "") -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(OPENVID_HEADER))
        writer.writeheader()
        writer.writerows(rows)
        handle.write(extra_lines)
    return path


@pytest.fixture
def tricky_rows(procedural_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Good clips plus rows whose fate depends on other rows in other parts: a duplicate of an early row near the end,
    two names that sanitise to one key in different blocks, a missing file and a short row."""
    videos = tmp_path / "videos"
    shutil.copytree(procedural_root / "videos", videos)
    shutil.copy(videos / "proc_00001.mp4", videos / "same.key.mp4")
    shutil.copy(videos / "proc_00002.mp4", videos / "same_key.mp4")
    with open(procedural_root / "openvid.csv", newline="") as handle:
        good = list(csv.DictReader(handle))
    rows = [
        {**good[0], "video": "same.key.mp4"},
        *good[:3],
        {**good[0], "video": "missing.mp4"},
        *good[3:],
        {**good[0], "video": "./proc_00000.mp4"},  # the same file as row 2: a duplicate in the single build too
        {**good[0], "video": "same_key.mp4"},  # key same_key is taken by row 1 in another part
    ]
    return _write_csv(tmp_path / "rows.csv", rows, extra_lines="short_row.mp4,only two fields\n"), videos


def _members(folder: Path, manifest_name: str = MANIFEST_NAME) -> dict[str, bytes]:
    """Every tar member of the shards a manifest lists, by member name."""
    manifest = json.loads((folder / manifest_name).read_text())
    members: dict[str, bytes] = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["name"]) as archive:
            for member in archive.getmembers():
                assert member.name not in members, f"{member.name} in two shards"
                members[member.name] = archive.extractfile(member).read()
    return members


def test_the_union_of_the_parts_is_the_single_build(tricky_rows: tuple[Path, Path], tmp_path: Path) -> None:
    csv_path, videos = tricky_rows
    single = tmp_path / "single"
    build_shards(BuildConfig(str(csv_path), str(videos), str(single), shard_max_count=2, num_workers=1), False, False)
    out = tmp_path / "parts"
    reports = [
        build_shards(
            BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=2, num_workers=1, part=(index, 3)),
            progress=False,
        )
        for index in range(3)
    ]
    assert [report.manifest_path.name for report in reports] == [f"manifest.part000{i}of0003.json" for i in range(3)]
    assert all(name.startswith(f"part000{i}of0003-") for i, r in enumerate(reports) for name in r.shards)
    part_manifests = [json.loads(report.manifest_path.read_text()) for report in reports]
    assert [m["part"]["records"] for m in part_manifests] == [[0, 3], [3, 7], [7, 11]]
    assert not (out / MANIFEST_NAME).exists()

    assert cli_main(["merge", str(out)]) == 0
    merged, reference = (json.loads((folder / MANIFEST_NAME).read_text()) for folder in (out, single))
    assert _members(out) == _members(single)  # same keys, same json/txt/video bytes
    assert merged["num_samples"] == reference["num_samples"] == 8
    for key in ("config", "num_rows", "num_rejected", "rejected_by_stage", "rejected"):
        assert merged[key] == reference[key], key
    reasons = {rejection["video"]: rejection["reason"] for rejection in merged["rejected"]}
    assert "duplicate video './proc_00000.mp4': the same file as line 3" in reasons["./proc_00000.mp4"]
    assert "same_key_L11.json" in _members(out)  # the key the single build gave it, though row 1 is in part 0
    assert (out / "rejected.csv").read_text() == (single / "rejected.csv").read_text()
    assert verify_shards(out).startswith(f"{out}: OK, 8 samples")
    assert resolve_shards(out) == [str(out / shard["name"]) for shard in merged["shards"]]
    # Merging again replaces only what the merge wrote; a part re-run is a no-op resume.
    assert merge_parts(out) == merged
    again = build_shards(
        BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=2, part=(1, 3)), False, False
    )
    assert again.resumed_shards == len(reports[1].shards)


def test_a_killed_part_resumes_on_its_own(procedural_root: Path, probe_hooks: Path, tmp_path: Path) -> None:
    csv_path, videos = procedural_root / "openvid.csv", procedural_root / "videos"
    out = tmp_path / "shards"
    part0 = build_shards(
        BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=1, part=(0, 2)), False, False
    )
    part0_files = {name: (out / name).stat().st_mtime_ns for name in part0.shards}
    command = [
        *(sys.executable, "-m", "data_pipelines.cli", "build", "--no-progress", "--part", "1/2"),
        *("--csv", str(csv_path), "--video-root", str(videos), "--out", str(out), "--max-count", "1"),
        *("--workers", "1", "--probe-fn", "probe_hooks:slow_probe"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe_hooks), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE)
    first, journal = out / "part0001of0002-000000.tar", out / ".build_journal.part0001of0002.jsonl"
    deadline = time.monotonic() + 60
    # Kill once the first shard is journaled (the file is renamed into place just before its journal line).
    while not (journal.is_file() and '"type": "shard"' in journal.read_text()):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the part's first shard never appeared"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "part0001of0002-000002.tar").exists(), "part finished before the kill; the test proves nothing"
    with pytest.raises(
        MergeError, match=r"part 1/2: not finished .*re-run its `genvis-shards build \.\.\. --part 1/2`"
    ):
        merge_parts(out)
    inode = first.stat().st_ino
    part1 = build_shards(
        BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=1, part=(1, 2)), False, False
    )
    assert part1.resumed_shards >= 1 and first.stat().st_ino == inode
    assert {name: (out / name).stat().st_mtime_ns for name in part0.shards} == part0_files  # other part untouched
    single = tmp_path / "single"
    build_shards(BuildConfig(str(csv_path), str(videos), str(single)), progress=False)
    merge_parts(out)
    assert _members(out) == _members(single)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4/4", r"expected 0 <= I < N = 4 \(parts count from 0\), got I = 4"),
        ("1/0", r"expected N >= 1 parts, got N = 0"),
        ("-1/4", r"expected I/N with whole numbers 0 <= I < N .* got '-1/4'"),
        ("1", r"expected I/N .* got '1'"),
        ("a/b", r"expected I/N .* got 'a/b'"),
    ],
)
def test_bad_part_values_are_clear_errors(
    text: str, message: str, procedural_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_part(text)
    out = tmp_path / "out"
    argv = ["build", "--csv", str(procedural_root / "openvid.csv"), "--video-root", str(tmp_path), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--part", text])
    assert exit_info.value.code == 2
    assert "--part" in capsys.readouterr().err and not out.exists()


def test_part_config_checks_and_bounds() -> None:
    with pytest.raises(ValueError, match="expected 0 <= I < N = 2"):
        BuildConfig("rows.csv", "videos", "out", part=(2, 2))
    with pytest.raises(ValueError, match="expected whole numbers"):
        BuildConfig("rows.csv", "videos", "out", part=(0.5, 2))
    blocks = [part_bounds(10, (index, 4)) for index in range(4)]
    assert blocks == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [part_bounds(2, (index, 3)) for index in range(3)] == [(0, 0), (0, 1), (1, 2)]  # a part may be empty


def test_merge_and_mixing_errors(procedural_root: Path, tmp_path: Path) -> None:
    csv_path, videos = str(procedural_root / "openvid.csv"), str(procedural_root / "videos")
    out = tmp_path / "parts"
    with pytest.raises(FileNotFoundError):
        merge_parts(out)
    out.mkdir()
    with pytest.raises(MergeError, match="no part builds found"):
        merge_parts(out)
    build_shards(BuildConfig(csv_path, videos, str(out), part=(0, 3)), progress=False)
    with pytest.raises(MergeError, match=r"part 1/3: not built .*\n  part 2/3: not built"):
        merge_parts(out)
    build_shards(BuildConfig(csv_path, videos, str(out), part=(1, 3)), progress=False)
    build_shards(BuildConfig(csv_path, videos, str(out), part=(2, 3), min_frames=10), progress=False)
    with pytest.raises(MergeError, match=r"manifest.part0002of0003.json: built with other options .*'min_frames'"):
        merge_parts(out)
    build_shards(BuildConfig(csv_path, videos, str(out), part=(2, 3)), overwrite=True, progress=False)
    (out / MANIFEST_NAME).write_text('{"mine": true}')
    with pytest.raises(OutputConflictError, match="not written by `genvis-shards merge`"):
        merge_parts(out)
    assert (out / MANIFEST_NAME).read_text() == '{"mine": true}'
    (out / MANIFEST_NAME).unlink()
    assert merge_parts(out)["num_samples"] == 6
    # A whole build and part builds never share a folder, either way round.
    with pytest.raises(OutputConflictError, match="holds a --part build"):
        build_shards(BuildConfig(csv_path, videos, str(out)), progress=False)
    whole = tmp_path / "whole"
    build_shards(BuildConfig(csv_path, videos, str(whole)), progress=False)
    with pytest.raises(OutputConflictError, match=r"holds a whole \(non --part\) build"):
        build_shards(BuildConfig(csv_path, videos, str(whole), part=(0, 2)), progress=False)
    with pytest.raises(OutputConflictError, match="needs no merge"):
        merge_parts(whole)
    build_shards(BuildConfig(csv_path, videos, str(out), part=(0, 2)), progress=False)
    with pytest.raises(MergeError, match=r"different splits \(N = 2, N = 3\)"):
        merge_parts(out)
