"""fsspec URLs as ``genvis-shards build`` inputs (issue 15): the row file and the video folder on fsspec's memory
filesystem and behind a loopback ``http.server``.

The memory filesystem lives in one process, and probes run in spawned workers, so its test reads the rows, locates
and probes the videos in this process; the http test runs whole builds. fsspec's http(s) needs ``aiohttp``, a dependency
of the ``data`` extra (part of ``dev``): the http builds always run, and the error naming the package is tested by
hiding it."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import shutil
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp  # noqa: F401 (fsspec's http filesystem needs it: the data extra installs it)
import fsspec
import pytest

from data_pipelines.build import BuildConfig, build_shards, read_csv_rows
from data_pipelines.probe import ProbeRequest, VideoLocation, open_video_stream, probe_video
from data_pipelines.remote import RemoteInputError
from genvis.data.schema import OPENVID_HEADER


def _rows_with_bad_ones(procedural_root: Path) -> list[dict[str, str]]:
    with open(procedural_root / "openvid.csv", newline="") as handle:
        good = list(csv.DictReader(handle))
    missing = {**good[0], "video": "not_there.mp4"}
    escape = {**good[1], "video": "../openvid.csv"}
    return [*good[:3], missing, *good[3:], escape]  # lines 2-4 good, 5 missing, 6-8 good, 9 escapes


def _csv_bytes(rows: list[dict[str, str]]) -> bytes:
    lines = [",".join(OPENVID_HEADER)]
    for row in rows:
        lines.append(",".join(f'"{row[name]}"' if "," in row[name] else row[name] for name in OPENVID_HEADER))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def memory_root(procedural_root: Path) -> Iterator[str]:
    fs = fsspec.filesystem("memory")
    root = f"/genvis-test-{uuid.uuid4().hex}"
    fs.pipe(f"{root}/rows.csv", _csv_bytes(_rows_with_bad_ones(procedural_root)))
    for video in sorted((procedural_root / "videos").iterdir()):
        fs.pipe(f"{root}/videos/{video.name}", video.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_rows_and_videos_on_fsspec_memory_filesystem(memory_root: str, procedural_root: Path, tmp_path: Path) -> None:
    config = BuildConfig(f"{memory_root}/rows.csv", f"{memory_root}/videos", str(tmp_path / "out"))
    rows, rejected = read_csv_rows(config)
    assert [row.line for row in rows] == [2, 3, 4, 6, 7, 8]
    assert all(row.location.path == f"{memory_root}/videos/{row.values['video']}" for row in rows)
    assert [(r.line, r.stage, r.reason) for r in rejected] == [
        (5, "file", f"FileNotFoundError: video file not found: {memory_root}/videos/not_there.mp4"),
        (9, "file", f"column 'video': path '../openvid.csv' escapes --video-root {memory_root}/videos"),
    ]
    # The probe copies the URL to a temporary file and finds what it finds in the local file; the writer's stream
    # gives the same bytes.
    local = probe_video(ProbeRequest(0, VideoLocation(str(procedural_root / "videos" / "proc_00000.mp4"))))
    remote = probe_video(ProbeRequest(0, rows[0].location))
    assert remote.ok and remote.info == local.info
    stream, size = open_video_stream(rows[0].location)
    with stream:
        assert stream.read() == (procedural_root / "videos" / "proc_00000.mp4").read_bytes()
    assert size == (procedural_root / "videos" / "proc_00000.mp4").stat().st_size
    # The resume fingerprint keeps the URL and hashes the remote row file.
    fingerprint = config.fingerprint()
    assert (
        fingerprint["csv_path"] == f"{memory_root}/rows.csv" and fingerprint["video_root"] == f"{memory_root}/videos"
    )
    import hashlib

    assert fingerprint["csv_sha256"] == hashlib.sha256(_csv_bytes(_rows_with_bad_ones(procedural_root))).hexdigest()
    # JSONL rows from a URL; a URL that is not there is a clear error.
    fsspec.filesystem("memory").pipe(
        f"{memory_root.removeprefix('memory://')}/rows.jsonl",
        b'{"video": "proc_00001.mp4", "caption": "a clip"}\n{"video": "proc_00002.mp4"}\n',
    )
    rows, rejected = read_csv_rows(BuildConfig(f"{memory_root}/rows.jsonl", f"{memory_root}/videos", "x"))
    assert [row.key for row in rows] == ["proc_00001"]
    assert [(r.line, r.reason) for r in rejected] == [(2, "column 'caption': expected a non-empty value, got ''")]
    with pytest.raises(ValueError, match=r"memory://.*/nothing\.csv: CSV row file not found"):
        read_csv_rows(BuildConfig(f"{memory_root}/nothing.csv", f"{memory_root}/videos", "x"))


@pytest.fixture
def http_root(procedural_root: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback http.server (no range requests, as a plain static server) serving rows.csv + videos/."""
    served = tmp_path / "served"
    shutil.copytree(procedural_root / "videos", served / "videos")
    (served / "rows.csv").write_bytes(_csv_bytes(_rows_with_bad_ones(procedural_root)))

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_build_from_a_loopback_http_server_equals_the_local_build(http_root: tuple[str, Path], tmp_path: Path) -> None:
    url, served = http_root
    local = build_shards(
        BuildConfig(str(served / "rows.csv"), str(served / "videos"), str(tmp_path / "local")), progress=False
    )
    over_http = build_shards(
        BuildConfig(f"{url}/rows.csv", f"{url}/videos", str(tmp_path / "http"), shard_max_count=4), progress=False
    )
    assert over_http.num_samples == local.num_samples == 6
    assert [(r.line, r.stage) for r in over_http.rejected] == [(5, "file"), (9, "file")]
    assert over_http.rejected[0].reason == f"FileNotFoundError: video file not found: {url}/videos/not_there.mp4"
    # Same samples, byte for byte (shard boundaries differ: 4 per shard here, 1000 locally).
    local_manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    http_manifest = json.loads((tmp_path / "http" / "manifest.json").read_text())
    assert http_manifest["config"]["csv_path"] == f"{url}/rows.csv"
    assert http_manifest["config"]["csv_sha256"] == local_manifest["config"]["csv_sha256"]
    import tarfile

    def members(folder: Path) -> dict[str, bytes]:
        found = {}
        for shard in sorted(folder.glob("*.tar")):
            with tarfile.open(shard) as archive:
                found.update({m.name: archive.extractfile(m).read() for m in archive.getmembers()})
        return found

    assert members(tmp_path / "http") == members(tmp_path / "local")
    # Resume from the URL inputs: nothing to do, the same shards.
    again = build_shards(
        BuildConfig(f"{url}/rows.csv", f"{url}/videos", str(tmp_path / "http"), shard_max_count=4), progress=False
    )
    assert again.resumed_shards == 2 and again.shards == over_http.shards


def test_a_url_whose_filesystem_package_is_missing_is_named(
    monkeypatch: pytest.MonkeyPatch, procedural_root: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    for name in [n for n in sys.modules if n.startswith("fsspec.implementations.http")]:
        monkeypatch.delitem(sys.modules, name)
    for protocol in ("http", "https"):  # fsspec keeps the classes it imported
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, protocol, raising=False)
    config = BuildConfig(str(procedural_root / "openvid.csv"), "http://127.0.0.1:9/videos", str(tmp_path / "out"))
    with pytest.raises(RemoteInputError, match=r"reading http:// URLs needs 'aiohttp'.*pip install aiohttp"):
        build_shards(config, progress=False)
    assert not (tmp_path / "out").exists()
