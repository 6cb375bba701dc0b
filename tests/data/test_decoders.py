"""Decoders (issue 15): decord (default), torchcodec and PyAV, picked automatically with one log line naming the
decoder and why, in the shard builder and the loaders alike; ``--decoder`` / ``decoder=`` to pick one; a clear error
naming the package when a requested decoder is missing; the same frames from every decoder.

decord (its only wheels) and torchcodec (the ``data`` extra: the wheel built for the installed torch, torch 2.13.0 ->
torchcodec 0.13.0, plus FFmpeg's shared libraries from the system, which scripts/test.sh installs on Debian) are
dependencies on x86_64 Linux only. There every decoder's case runs and a missing or broken one fails; on other
platforms a decoder that is not there is skipped with the reason. PyAV is a dependency everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.build import BuildConfig, build_shards
from data_pipelines.cli import main as cli_main
from data_pipelines.probe import ProbeRequest, VideoLocation, probe_video
from genvis.data import video as video_module
from genvis.data.builtin import procedural_video
from genvis.data.loaders import ClipConfig, make_video_dataset
from genvis.data.video import (
    DecoderUnavailableError,
    FileSlice,
    available_decoders,
    decoder_problem,
    encode_mp4,
    read_frames,
    resolve_decoder,
    video_info,
)

DECODER_LOG = "genvis.data.decoder"


# Where pyproject.toml installs decord and torchcodec (their platform markers): there a decoder that does not load fails.
DECODERS_ARE_DEPENDENCIES = sys.platform == "linux" and platform.machine() == "x86_64"


def _platform_skip(name: str) -> pytest.MarkDecorator | None:
    """Skip a decoder's case only where the package is no dependency and is not there (decord has no wheels for
    aarch64 / macOS; the data extra lists torchcodec for x86_64 Linux only)."""
    problem = decoder_problem(name)
    if problem is None or name == "pyav" or DECODERS_ARE_DEPENDENCIES:
        return None
    where = f"{sys.platform} {platform.machine()}"
    return pytest.mark.skip(reason=f"{name} is {problem}; it is a dependency on x86_64 Linux only, not on {where}")


def _decoder_param(name: str):
    mark = _platform_skip(name)
    return pytest.param(name, marks=[mark] if mark else [], id=name)


ALL_DECODERS = [_decoder_param(name) for name in ("decord", "torchcodec", "pyav")]


@pytest.fixture(autouse=True)
def fresh_decoder_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees its own 'decoding videos with ...' line (the line is logged once per process)."""
    monkeypatch.setattr(video_module, "_LOGGED_CHOICES", set())


def _hide(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make ``packages`` unimportable, as on a machine without them (decord has no aarch64 / macOS wheels)."""
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


def _choices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == DECODER_LOG]


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 12-frame 64x32 H.264 clip on disk and its source frames."""
    frames = procedural_video(2, num_frames=12, size=64).frames[:, :32]
    path = tmp_path_factory.mktemp("decoders") / "clip.mp4"
    path.write_bytes(encode_mp4(frames, fps=8))
    return path, frames


@pytest.fixture(scope="module")
def shard_dir(procedural_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("decoder_shards")
    build_shards(
        BuildConfig(str(procedural_root / "openvid.csv"), str(procedural_root / "videos"), str(out)), progress=False
    )
    return out


@pytest.mark.skipif(
    not DECODERS_ARE_DEPENDENCIES, reason="decord and torchcodec are dependencies on x86_64 Linux only"
)
@pytest.mark.parametrize("decoder", ["decord", "torchcodec"])
def test_the_platform_decoders_load(decoder: str) -> None:
    """On x86_64 Linux, `pip install -e ".[dev]"` installs decord and torchcodec; torchcodec also needs FFmpeg's
    shared libraries (scripts/test.sh installs Debian's when missing)."""
    problem = decoder_problem(decoder)
    assert problem is None, (
        f"{decoder} is {problem}: run `pip install -e '.[dev]'` (torchcodec: and the FFmpeg libraries of scripts/test.sh)"
    )


def test_auto_picks_decord_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    if (mark := _platform_skip("decord")) is not None:
        pytest.skip(mark.kwargs["reason"])
    assert resolve_decoder() == ("decord", "auto: the default")
    with caplog.at_level(logging.INFO, logger=DECODER_LOG):
        for _ in range(3):
            video_module.log_decoder_choice("video loader")
    assert _choices(caplog) == ["video loader: decoding videos with decord (auto: the default)"]


def test_without_decord_pyav_is_chosen_and_logged_in_loader_and_builder(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    procedural_root: Path,
    shard_dir: Path,
    tmp_path: Path,
) -> None:
    _hide(monkeypatch, "decord", "torchcodec")
    assert available_decoders() == ["pyav"]
    why = "auto: decord is not installed, torchcodec is not installed"
    assert resolve_decoder() == ("pyav", why)
    clip = ClipConfig(num_frames=3, frame_stride=2, resolution_buckets=[(16, 16)], position="start")
    with caplog.at_level(logging.INFO, logger=DECODER_LOG):
        batches = list(make_video_dataset(shard_dir, clip, batch_size=6, resampled=False, shuffle_buffer=0))
        report = build_shards(
            BuildConfig(str(procedural_root / "openvid.csv"), str(procedural_root / "videos"), str(tmp_path / "out")),
            progress=False,
        )
    assert _choices(caplog) == [
        f"video loader: decoding videos with PyAV ({why})",
        f"genvis-shards build: probes: decoding videos with PyAV ({why})",
    ]
    assert sum(len(batch["__key__"]) for batch in batches) == 6
    # The probe workers (spawned: they do not see this test's sys.modules) were told to use PyAV, and did.
    manifest = json.loads(report.manifest_path.read_text())
    assert manifest["decoder"] == "pyav" and report.num_samples == 6 and not report.rejected
    reference = json.loads((shard_dir / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]


def test_a_requested_decoder_that_is_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
    procedural_root: Path,
    shard_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _hide(monkeypatch, "decord", "torchcodec")
    for name, package in (("decord", "decord"), ("torchcodec", "torchcodec")):
        message = f"decoder '{name}' was requested but the '{package}' package is not installed; install"
        with pytest.raises(DecoderUnavailableError, match=message) as raised:
            read_frames(b"", [0], decoder=name)
        assert "available here: 'pyav'" in str(raised.value)
        with pytest.raises(DecoderUnavailableError, match=message):
            make_video_dataset(shard_dir, ClipConfig(), resampled=False, decoder=name)
    with pytest.raises(ValueError, match=r"decoder: expected one of .*got 'ffmpeg'"):
        read_frames(b"", [0], decoder="ffmpeg")
    # CLI: exit 1, the package named, nothing created (the check runs before --out is touched).
    out = tmp_path / "out"
    argv = ["build", "--no-progress", "--csv", str(procedural_root / "openvid.csv")]
    argv += ["--video-root", str(procedural_root / "videos"), "--out", str(out), "--decoder", "torchcodec"]
    assert cli_main(argv) == 1
    assert "the 'torchcodec' package is not installed" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["verify", str(shard_dir), "--decode", "--decoder", "decord"]) == 1
    assert "the 'decord' package is not installed" in capsys.readouterr().err
    _hide(monkeypatch, "av")
    with pytest.raises(DecoderUnavailableError, match="no video decoder: decord is not installed, torchcodec is not"):
        resolve_decoder()


def test_an_installed_torchcodec_that_does_not_load_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """torchcodec without FFmpeg's libraries (or built for another torch) is installed but unusable: auto skips it
    and says why; asking for it names the load error."""
    fake = tmp_path / "site" / "torchcodec"
    (fake / "decoders").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "decoders" / "__init__.py").write_text("raise RuntimeError('Could not load libtorchcodec. FFmpeg 4-8')\n")
    _hide(monkeypatch, "decord")
    monkeypatch.delitem(sys.modules, "torchcodec", raising=False)
    monkeypatch.delitem(sys.modules, "torchcodec.decoders", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(video_module, "_LOAD_FAILURES", {})
    problem = "installed but does not load (RuntimeError: Could not load libtorchcodec. FFmpeg 4-8)"
    assert decoder_problem("torchcodec") == problem
    assert resolve_decoder() == ("pyav", f"auto: decord is not installed, torchcodec is {problem}")
    with pytest.raises(DecoderUnavailableError, match="'torchcodec' package is installed but does not load"):
        resolve_decoder("torchcodec")


def _tar_member(shard: Path, suffix: str) -> FileSlice:
    with tarfile.open(shard) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(suffix))
        return FileSlice(str(shard), member.offset_data, member.size)


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_every_decoder_reads_the_same_frames(decoder: str, clip_mp4: tuple[Path, np.ndarray], shard_dir: Path) -> None:
    """Path, tar member in place and bytes give the same frames, sizes and counts as PyAV (within 1 grey level on
    average: decoders may convert yuv420p to RGB slightly differently), and close to the source frames."""
    path, source = clip_mp4
    indices = [0, 5, 11, 11, 3]  # unsorted, repeated: what the uniform fallback of short clips produces
    reference = read_frames(path, indices, decoder="pyav")
    for where in (path, path.read_bytes()):
        frames = read_frames(where, indices, decoder=decoder)
        assert frames.shape == reference.shape == (5, 32, 64, 3) and frames.dtype == np.uint8
        assert np.abs(frames.astype(int) - reference).mean() <= 1.0
    assert np.abs(frames.astype(int) - source[indices]).mean() < 6
    assert video_info(path, decoder=decoder) == video_info(path, decoder="pyav")
    member = _tar_member(next(iter(sorted(shard_dir.glob("*.tar")))), ".mp4")
    in_place = read_frames(member, [0, 8], decoder=decoder)
    assert np.abs(in_place.astype(int) - read_frames(member.read(), [0, 8], decoder="pyav")).mean() <= 1.0
    with pytest.raises(IndexError, match=r"expected values in \[0, 12\)"):
        read_frames(path, [12], decoder=decoder)
    # The builder's probe reports the same facts with each decoder.
    probed = probe_video(ProbeRequest(0, VideoLocation(str(path)), decoder=decoder))
    assert probed.ok, probed.reason
    pyav = probe_video(ProbeRequest(0, VideoLocation(str(path)), decoder="pyav"))
    assert probed.info == pyav.info
    # A corrupt file is a reason, not a crash, with every decoder.
    broken = path.parent / f"broken_{decoder}.mp4"
    broken.write_bytes(path.read_bytes()[: os.path.getsize(path) // 3])
    bad = probe_video(ProbeRequest(0, VideoLocation(str(broken)), decoder=decoder))
    assert not bad.ok and bad.reason


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_loader_and_build_with_an_explicit_decoder(
    decoder: str, procedural_root: Path, shard_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clip = ClipConfig(num_frames=3, frame_stride=4, resolution_buckets=[(32, 32)], position="start")
    with caplog.at_level(logging.INFO, logger=DECODER_LOG):
        ours = next(iter(make_video_dataset(shard_dir, clip, batch_size=2, resampled=False, decoder=decoder)))
        report = build_shards(
            BuildConfig(
                str(procedural_root / "openvid.csv"),
                str(procedural_root / "videos"),
                str(tmp_path / "out"),
                decoder=decoder,
            ),
            progress=False,
        )
    label = video_module.DECODER_LABELS[decoder]
    assert _choices(caplog) == [
        f"video loader: decoding videos with {label} (requested)",
        f"genvis-shards build: probes: decoding videos with {label} (requested)",
    ]
    pyav = next(iter(make_video_dataset(shard_dir, clip, batch_size=2, resampled=False, decoder="pyav")))
    assert ours["__key__"] == pyav["__key__"]
    assert (ours["video"] - pyav["video"]).abs().mean() < 1 / 127.5
    reference = json.loads((shard_dir / "manifest.json").read_text())
    manifest = json.loads(report.manifest_path.read_text())
    assert manifest["decoder"] == decoder and report.num_samples == reference["num_samples"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
