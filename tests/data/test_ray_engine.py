"""``genvis-shards build --engine ray`` (issue 15) on a local Ray cluster: partitions of rows are probed as Ray tasks,
the shards are byte for byte the single-process build's, and a partition is the unit of resume (a re-run probes
only the partitions the probe journal lacks). One local Ray instance serves the module (starting it takes ~10 s on
2 cores)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from data_pipelines.build import BuildConfig, BuildEnvironmentError, build_shards
from data_pipelines.cli import main as cli_main
from genvis.data.schema import JOURNAL_NAME, MANIFEST_NAME

HOOKS = """
import os

from data_pipelines.probe import probe_video

LOG = {log!r}


def logged(request):
    with open(LOG, "a") as handle:
        handle.write(os.path.basename(request.location.path) + "\\n")
    return probe_video(request)
"""


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-CPU local Ray instance whose workers can import ``ray_probe_hooks`` (``logged`` notes every probe in
    ``probed.log``); yields that log."""
    hooks = tmp_path_factory.mktemp("ray_hooks")
    log = hooks / "probed.log"
    (hooks / "ray_probe_hooks.py").write_text(HOOKS.format(log=str(log)))
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), saved["PYTHONPATH"]]))
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    sys.path.insert(0, str(hooks))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield log
    finally:
        ray.shutdown()
        sys.path.remove(str(hooks))
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.tar"))}


def _config(procedural_root: Path, out: Path, **options) -> BuildConfig:
    csv_path, videos = procedural_root / "openvid.csv", procedural_root / "videos"
    return BuildConfig(str(csv_path), str(videos), str(out), shard_max_count=2, num_workers=2, **options)


@pytest.mark.slow
def test_ray_build_equals_the_local_build_and_resumes_by_partition(
    local_ray: Path, procedural_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probed = local_ray
    local = build_shards(_config(procedural_root, tmp_path / "local"), progress=False)
    out = tmp_path / "ray"
    options = {"engine": "ray", "partition_size": 2, "probe_fn": "ray_probe_hooks:logged"}
    on_ray = build_shards(_config(procedural_root, out, **options), progress=False)
    assert on_ray.shards == local.shards and _digests(out) == _digests(tmp_path / "local")
    manifests = [json.loads((folder / MANIFEST_NAME).read_text()) for folder in (tmp_path / "local", out)]
    assert manifests[0]["shards"] == manifests[1]["shards"] and manifests[1]["engine"] == "ray"
    probes = [json.loads(line) for line in (out / ".build_probes.jsonl").read_text().splitlines()]
    assert sorted(record["number"] for record in probes[1:]) == [0, 1, 2]  # 6 rows, 2 per partition
    assert len(probed.read_text().splitlines()) == 6

    def lose_the_shards() -> None:
        """What a kill after probing and before writing leaves: no shards, the probe journal kept."""
        for name in on_ray.shards:
            (out / name).unlink()
        (out / JOURNAL_NAME).write_text(journal[0] + "\n")

    journal = (out / JOURNAL_NAME).read_text().splitlines()
    lose_the_shards()
    probed.write_text("")
    again = build_shards(_config(procedural_root, out, **options), progress=False)
    assert probed.read_text() == "" and again.rejected == []  # no row probed again
    assert _digests(out) == _digests(tmp_path / "local")

    # A partition missing from the probe journal is the one probed again.
    (out / ".build_probes.jsonl").write_text("\n".join(json.dumps(record) for record in probes[:-1]) + "\n")
    lose_the_shards()
    with caplog.at_level(logging.INFO, logger="data_pipelines.ray_engine"):
        build_shards(_config(procedural_root, out, **options), progress=False)
    assert "ray: 1 partitions to probe (2 rows), 4 rows' results kept from an earlier run" in caplog.text
    assert len(probed.read_text().splitlines()) == 2
    assert _digests(out) == _digests(tmp_path / "local")


@pytest.mark.slow
def test_a_local_build_resumes_a_ray_build(local_ray: Path, procedural_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    build_shards(_config(procedural_root, out, engine="ray"), progress=False)
    report = build_shards(_config(procedural_root, out), progress=False)  # the engine is not in the fingerprint
    assert report.resumed_shards == len(report.shards) == 3


def test_ray_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, procedural_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "out"
    with pytest.raises(
        BuildEnvironmentError, match=r"--engine ray needs the 'ray' package.*pip install 'ray==2.60.0'"
    ):
        build_shards(_config(procedural_root, out, engine="ray"), progress=False)
    assert not out.exists()
    argv = ["build", "--csv", str(procedural_root / "openvid.csv"), "--video-root", str(procedural_root / "videos")]
    assert cli_main([*argv, "--out", str(out), "--engine", "ray", "--no-progress"]) == 1
    assert "needs the 'ray' package" in capsys.readouterr().err
