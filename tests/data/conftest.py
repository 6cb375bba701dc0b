"""Fixtures for the data tests: tiny procedural videos (9-17 frames, 32 px) and probe hooks for the builder."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from genvis.data.builtin import write_procedural_dataset

# Probe hooks loaded by spawned probe workers through ``--probe-fn probe_hooks:<name>`` (module on sys.path).
PROBE_HOOKS = textwrap.dedent(
    """
    import os
    import time

    from data_pipelines.probe import probe_video


    def misbehaving_probe(request):
        name = os.path.basename(request.location.path)
        if "hang" in name:
            time.sleep(600)
        if "abort" in name:
            os.abort()
        return probe_video(request)


    def slow_probe(request):
        time.sleep(0.4)
        return probe_video(request)
    """
)


@pytest.fixture(scope="session")
def procedural_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 9-frame 32 px procedural clips + their OpenVid CSV (shared, read-only)."""
    root = tmp_path_factory.mktemp("procedural")
    write_procedural_dataset(root, num_videos=6, num_frames=9, size=32, seed=3)
    return root


@pytest.fixture
def probe_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Directory holding the ``probe_hooks`` module, put on sys.path (spawned workers inherit it) and PYTHONPATH."""
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    (hook_dir / "probe_hooks.py").write_text(PROBE_HOOKS)
    monkeypatch.syspath_prepend(str(hook_dir))
    return hook_dir
