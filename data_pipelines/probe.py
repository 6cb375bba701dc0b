"""Probe videos with decord, torchcodec or PyAV (``--decoder``, default ``auto``: the first of them installed) in
worker subprocesses, each under a timeout.

A video may be a local file, a zip member or an fsspec URL (``data_pipelines.remote``: copied to a temporary file).

Videos are decoded where they lie (a path, a stored zip member as a byte range, a compressed member unpacked to a
temporary file): a probe's memory does not grow with the file size.

decord can hang forever (dmlc/decord #375, ``get_batch`` at 100% CPU) or abort the whole process on a corrupt NAL
(#25, an uncatchable ``dmlc::Error``), see specs/perf_reliability_ecosystem.md §B5. So every probe runs in a spawned
worker process; a worker that overruns its timeout is killed and one that dies is replaced, and either outcome is
recorded as the video's rejection reason while the build goes on.
Checked by ``tests/data/test_shard_builder.py`` (hang, abort, corrupt, truncated, zero-byte, non-video files).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from data_pipelines import remote
from genvis.data.video import (
    Decoder,
    DecoderName,
    DecoderUnavailableError,
    FileSlice,
    VideoSource,
    container_extension,
    resolve_decoder,
)

DEFAULT_PROBE_FN = "data_pipelines.probe:probe_video"


@dataclass(frozen=True)
class VideoLocation:
    """Where a video's bytes live: a file, or a member of a zip archive.

    Args:
        path: file path, or the zip archive's path when ``member`` is set.
        member: path inside the zip archive, None for a plain file.
    """

    path: str
    member: str | None = None

    def __str__(self) -> str:
        return f"{self.path}::{self.member}" if self.member else self.path


_ZIP_CACHE: dict[str, zipfile.ZipFile] = {}


def _archive(path: str) -> zipfile.ZipFile:
    archive = _ZIP_CACHE.get(path)
    if archive is None:
        archive = _ZIP_CACHE[path] = zipfile.ZipFile(path)
    return archive


def _stored_member_slice(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> FileSlice | None:
    """The member's bytes as a range of the zip file when it is stored uncompressed and unencrypted, else None."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or archive.filename is None:
        return None
    with open(archive.filename, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"{archive.filename}: bad local header for {info.filename!r}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return FileSlice(archive.filename, info.header_offset + 30 + name_length + extra_length, info.file_size)


def open_video_stream(location: VideoLocation) -> tuple[BinaryIO, int]:
    """A binary stream of the video and its size in bytes (read it in chunks; the caller closes it). A URL is
    streamed through fsspec."""
    if location.member is None:
        return remote.open_binary(location.path)
    archive = _archive(location.path)
    return archive.open(location.member), archive.getinfo(location.member).file_size


@contextlib.contextmanager
def decodable_source(location: VideoLocation) -> Iterator[VideoSource]:
    """A source decoders read in place: the file's path, a stored zip member's ``FileSlice``, or (for a compressed
    member or a URL) a temporary file it is copied into chunk by chunk. Never the whole video in memory."""
    if location.member is None and remote.is_url(location.path):
        suffix = os.path.splitext(location.path.rsplit("/", 1)[-1])[1]
        with tempfile.NamedTemporaryFile(prefix="genvis-probe-", suffix=suffix) as scratch:
            stream, _ = remote.open_binary(location.path)
            with stream:
                shutil.copyfileobj(stream, scratch, 1 << 20)
            scratch.flush()
            yield scratch.name
        return
    if location.member is None:
        yield location.path
        return
    archive = _archive(location.path)
    stored = _stored_member_slice(archive, archive.getinfo(location.member))
    if stored is not None:
        yield stored
        return
    suffix = os.path.splitext(location.member)[1]
    with tempfile.NamedTemporaryFile(prefix="genvis-probe-", suffix=suffix) as scratch:
        with archive.open(location.member) as member:
            shutil.copyfileobj(member, scratch, 1 << 20)
        scratch.flush()
        yield scratch.name


def read_video_bytes(location: VideoLocation) -> bytes:
    """The raw bytes of a video (whole file in memory: small files and tests only)."""
    stream, _ = open_video_stream(location)
    with stream:
        return stream.read()


def video_head(location: VideoLocation, size: int = 512) -> bytes:
    """The first ``size`` bytes of a video (container sniffing)."""
    stream, _ = open_video_stream(location)
    with stream:
        return stream.read(size)


@dataclass(frozen=True)
class ProbeRequest:
    """One video to probe.

    Args:
        index: position of the row in the CSV (0-based, data rows only); results are matched back by it.
        location: where the bytes are.
        expected_frames: the CSV ``frame`` value, to catch truncated files that still decode (None to skip).
        frame_tolerance: allowed relative mismatch between probed and expected frame counts.
        mode: ``sparse`` decodes the first, middle and last frames; ``full`` decodes every frame.
        decoder: ``auto`` or a decoder name (resolved in the worker, like in the main process).
    """

    index: int
    location: VideoLocation
    expected_frames: int | None = None
    frame_tolerance: float = 0.1
    mode: Literal["sparse", "full"] = "sparse"
    decoder: Decoder = "auto"


@dataclass
class ProbeResult:
    """What probing found. ``ok`` False means ``reason`` says why the video is rejected.

    Args:
        index: the request's index.
        ok: the video decoded and passed the checks.
        reason: rejection reason (empty when ok).
        info: ``width``, ``height``, ``probed_frames``, ``probed_fps``, ``probed_seconds``, ``container`` when ok.
        environment: the failure comes from this machine (no decoder installed), not from the video.
    """

    index: int
    ok: bool
    reason: str = ""
    info: dict[str, float | int | str] = field(default_factory=dict)
    environment: bool = False


# The earlier name: raised when no decoder (or not the requested one) can be used on this machine.
DecoderMissingError = DecoderUnavailableError


def probe_decoder(decoder: Decoder = "auto") -> DecoderName:
    """The decoder probes use: the requested one, or for ``auto`` decord, else torchcodec, else PyAV.

    Raises:
        DecoderUnavailableError: it (for ``auto``: every decoder) is not installed; the message names the package.
    """
    return resolve_decoder(decoder)[0]


_PROBES: dict[str, Callable[[VideoSource, ProbeRequest], tuple[int, float, int, int] | str]] = {}


def probe_video(request: ProbeRequest) -> ProbeResult:
    """Decode ``request``'s video in place with its decoder and check it; a bad video becomes a reason."""
    decoder = probe_decoder(request.decoder)
    head = video_head(request.location)
    if not head:
        return ProbeResult(request.index, False, "empty file (0 bytes)")
    with decodable_source(request.location) as source:
        probed = _PROBES[decoder](source, request)
    if isinstance(probed, str):
        return ProbeResult(request.index, False, probed)
    num_frames, fps, width, height = probed
    if request.expected_frames and abs(num_frames - request.expected_frames) > max(
        1, request.frame_tolerance * request.expected_frames
    ):
        # A truncated faststart mp4 decodes fine but reports fewer frames (§B5: 49 of 96 frames).
        return ProbeResult(
            request.index,
            False,
            f"frame count mismatch (truncated?): decoded {num_frames} frames, CSV 'frame' says {request.expected_frames}",
        )
    info = {
        "width": width,
        "height": height,
        "probed_frames": num_frames,
        "probed_fps": round(fps, 6),
        "probed_seconds": round(num_frames / fps, 6) if fps > 0 else 0.0,
        "container": container_extension(head) or "",
    }
    return ProbeResult(request.index, True, info=info)


def _source_url(source: VideoSource) -> str:
    return source.url() if isinstance(source, FileSlice) else str(source)


def _probe_decord(source: VideoSource, request: ProbeRequest) -> tuple[int, float, int, int] | str:
    """(frames, fps, width, height), or the reason the video is bad."""
    import decord

    try:
        reader = decord.VideoReader(_source_url(source), ctx=decord.cpu(0), num_threads=1)
    except (RuntimeError, decord.DECORDError) as error:
        return f"not a decodable video: {type(error).__name__}: {_short(error, source)}"
    num_frames = len(reader)
    if num_frames < 1:
        return "video has no frames"
    indices = list(range(num_frames)) if request.mode == "full" else sorted({0, num_frames // 2, num_frames - 1})
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        return f"decode failed: {type(error).__name__}: {_short(error, source)}"
    height, width = (int(size) for size in frames.shape[1:3])
    return num_frames, float(reader.get_avg_fps()), width, height


def _probe_pyav(source: VideoSource, request: ProbeRequest) -> tuple[int, float, int, int] | str:
    """PyAV fallback of ``_probe_decord``: count packets, then decode the checked frames in one scan."""
    import av

    from genvis.data.video import read_frames, video_info

    try:
        info = video_info(_source_url(source), decoder="pyav")
    except (av.FFmpegError, ValueError, IndexError) as error:
        return f"not a decodable video: {type(error).__name__}: {_short(error, source)}"
    if info.num_frames < 1:
        return "video has no frames"
    total = info.num_frames
    indices = None if request.mode == "full" else sorted({0, total // 2, total - 1})
    try:
        frames = read_frames(_source_url(source), indices, decoder="pyav")
    except (av.FFmpegError, ValueError, IndexError) as error:
        return f"decode failed: {type(error).__name__}: {_short(error, source)}"
    if request.mode == "full":
        total = len(frames)
    return total, info.fps, int(frames.shape[2]), int(frames.shape[1])


def _probe_torchcodec(source: VideoSource, request: ProbeRequest) -> tuple[int, float, int, int] | str:
    """torchcodec version of ``_probe_decord`` (exact seek mode: the frame count comes from a scan)."""
    from genvis.data.video import open_torchcodec

    try:
        reader = open_torchcodec(source)
        metadata = reader.metadata
    except (RuntimeError, ValueError) as error:
        return f"not a decodable video: {type(error).__name__}: {_short(error, source)}"
    num_frames = int(metadata.num_frames or 0)
    if num_frames < 1:
        return "video has no frames"
    indices = list(range(num_frames)) if request.mode == "full" else sorted({0, num_frames // 2, num_frames - 1})
    try:
        frames = reader.get_frames_at(indices).data
    except (RuntimeError, ValueError, IndexError) as error:
        return f"decode failed: {type(error).__name__}: {_short(error, source)}"
    height, width = (int(size) for size in frames.shape[1:3])
    return num_frames, float(metadata.average_fps or 0.0), width, height


_PROBES.update(decord=_probe_decord, torchcodec=_probe_torchcodec, pyav=_probe_pyav)

_CLOCK_STAMP = re.compile(r"\[\d{2}:\d{2}:\d{2}\]\s*|\S+\.(?:cc|cpp|h):\d+:\s*|\s*@\s*0x[0-9a-fA-F]+")


def _short(error: BaseException, source: VideoSource | None = None, limit: int = 200) -> str:
    """One line of an error, without clock stamps, source-file positions and pointers (reasons must be identical
    between identical runs) and with a ``subfile`` URL shown as the file it points into."""
    text = _CLOCK_STAMP.sub(" ", str(error))
    if isinstance(source, FileSlice):
        text = text.replace(source.url(), source.path)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_probe_fn(spec: str) -> Callable[[ProbeRequest], ProbeResult]:
    """Import a ``module:function`` probe (the default is ``probe_video``; tests inject slow/hanging ones)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"probe function: expected 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


def _worker_main(connection: multiprocessing.connection.Connection, probe_fn_spec: str) -> None:
    """Worker loop: receive ``ProbeRequest``s until None, send back ``ProbeResult``s."""
    # The parent handles Ctrl-C and kills workers; a worker dying on SIGINT would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import decord.logging

        decord.logging.set_level(decord.logging.QUIET)  # reasons are recorded; FFmpeg's chatter would flood stderr
    except ImportError:
        pass
    # decord also logs "ERROR opening: <uri>" lines straight to stderr (with the file's bytes when given bytes);
    # the reasons are sent back and recorded, so the worker's own stderr goes to /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    probe_fn = resolve_probe_fn(probe_fn_spec)
    while True:
        request = connection.recv()
        if request is None:
            return
        try:
            result = probe_fn(request)
        except ImportError as error:  # a missing decoder is this machine's problem, not the video's
            result = ProbeResult(request.index, False, f"{type(error).__name__}: {error}", environment=True)
        except Exception as error:  # any decoder/IO failure becomes a rejection reason, never a dead build
            result = ProbeResult(request.index, False, f"probe raised {type(error).__name__}: {_short(error)}")
        connection.send(result)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    tasks_done: int = 0


def _exit_description(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class ProbePool:
    """A pool of spawned probe workers with a per-task timeout.

    Unlike ``multiprocessing.Pool``/``ProcessPoolExecutor``, one hung or crashed task costs only its own worker: the
    worker is killed (timeout) or reaped (crash), the task gets a rejection reason, and a fresh worker takes its place.

    Args:
        num_workers: worker processes.
        timeout_s: wall-clock seconds one probe may take.
        probe_fn: ``module:function`` run on each request in the worker.
        max_tasks_per_worker: recycle a worker after this many probes, bounding decord's known leaks (#1, #279).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 60.0,
        probe_fn: str = DEFAULT_PROBE_FN,
        max_tasks_per_worker: int = 200,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers: expected >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        resolve_probe_fn(probe_fn)  # fail here, with a clear error, rather than in every worker
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.probe_fn = probe_fn
        self.max_tasks_per_worker = max_tasks_per_worker
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child_end, self.probe_fn), daemon=True)
        process.start()
        child_end.close()
        worker = _Worker(process, parent_end)
        self._workers.append(worker)
        return worker

    def _retire(self, worker: _Worker, kill: bool) -> None:
        if kill:
            worker.process.kill()
        else:
            try:
                worker.connection.send(None)
            except OSError:
                worker.process.kill()
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
        self._workers.remove(worker)

    def imap_unordered(self, requests: Iterable[ProbeRequest]) -> Iterator[ProbeResult]:
        """Probe every request, yielding results as they finish (match them by ``index``)."""
        pending = iter(requests)
        idle = [self._spawn() for _ in range(self.num_workers)]
        busy: dict[multiprocessing.connection.Connection, tuple[_Worker, ProbeRequest, float]] = {}
        exhausted = False
        try:
            while True:
                while idle and not exhausted:
                    request = next(pending, None)
                    if request is None:
                        exhausted = True
                        break
                    worker = idle.pop()
                    worker.connection.send(request)
                    busy[worker.connection] = (worker, request, time.monotonic() + self.timeout_s)
                if not busy:
                    break
                wait_s = max(0.0, min(deadline for _, _, deadline in busy.values()) - time.monotonic())
                for connection in multiprocessing.connection.wait(list(busy), timeout=wait_s):
                    worker, request, _ = busy.pop(connection)
                    try:
                        result = connection.recv()
                    except (EOFError, OSError):
                        worker.process.join(timeout=5)
                        reason = f"probe process crashed ({_exit_description(worker.process.exitcode)})"
                        self._retire(worker, kill=True)
                        idle.append(self._spawn())
                        yield ProbeResult(request.index, False, reason)
                        continue
                    worker.tasks_done += 1
                    if worker.tasks_done >= self.max_tasks_per_worker:
                        self._retire(worker, kill=False)
                        worker = self._spawn()
                    idle.append(worker)
                    yield result
                now = time.monotonic()
                for connection, (worker, request, deadline) in list(busy.items()):
                    if deadline <= now:
                        del busy[connection]
                        self._retire(worker, kill=True)
                        idle.append(self._spawn())
                        reason = f"probe timed out after {self.timeout_s:g} s (decoder hung; process killed)"
                        yield ProbeResult(request.index, False, reason)
        finally:
            self.close()

    def close(self) -> None:
        """Stop every worker (kill those still busy)."""
        for worker in list(self._workers):
            self._retire(worker, kill=worker.process.is_alive())
