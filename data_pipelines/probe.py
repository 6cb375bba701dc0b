"""Probe videos with decord in worker subprocesses, each task under a wall-clock timeout.

decord can hang forever (dmlc/decord #375, ``get_batch`` at 100% CPU) or abort the whole process on a corrupt NAL
(#25, an uncatchable ``dmlc::Error``), see specs/perf_reliability_ecosystem.md §B5. So every probe runs in a spawned
worker process; a worker that overruns its timeout is killed and one that dies is replaced, and either outcome is
recorded as the video's rejection reason while the build goes on.
Checked by ``tests/data/test_shard_builder.py`` (hang, abort, corrupt, truncated, zero-byte, non-video files).
"""

from __future__ import annotations

import importlib
import io
import multiprocessing
import multiprocessing.connection
import signal
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

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


def read_video_bytes(location: VideoLocation) -> bytes:
    """The raw bytes of a video (opened zip archives are cached per process)."""
    if location.member is None:
        with open(location.path, "rb") as handle:
            return handle.read()
    archive = _ZIP_CACHE.get(location.path)
    if archive is None:
        archive = _ZIP_CACHE[location.path] = zipfile.ZipFile(location.path)
    return archive.read(location.member)


@dataclass(frozen=True)
class ProbeRequest:
    """One video to probe.

    Args:
        index: position of the row in the CSV (0-based, data rows only); results are matched back by it.
        location: where the bytes are.
        expected_frames: the CSV ``frame`` value, to catch truncated files that still decode (None to skip).
        frame_tolerance: allowed relative mismatch between probed and expected frame counts.
        mode: ``sparse`` decodes the first, middle and last frames; ``full`` decodes every frame.
    """

    index: int
    location: VideoLocation
    expected_frames: int | None = None
    frame_tolerance: float = 0.1
    mode: Literal["sparse", "full"] = "sparse"


@dataclass
class ProbeResult:
    """What probing found. ``ok`` False means ``reason`` says why the video is rejected.

    Args:
        index: the request's index.
        ok: the video decoded and passed the checks.
        reason: rejection reason (empty when ok).
        info: ``width``, ``height``, ``probed_frames``, ``probed_fps``, ``probed_seconds`` when ok.
    """

    index: int
    ok: bool
    reason: str = ""
    info: dict[str, float | int] = field(default_factory=dict)


def probe_video(request: ProbeRequest) -> ProbeResult:
    """Decode ``request``'s video with decord and check it; every failure becomes a ``ProbeResult`` with a reason."""
    import decord

    data = read_video_bytes(request.location)
    if not data:
        return ProbeResult(request.index, False, "empty file (0 bytes)")
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except (RuntimeError, decord.DECORDError) as error:
        return ProbeResult(request.index, False, f"not a decodable video: {type(error).__name__}: {_short(error)}")
    num_frames = len(reader)
    if num_frames < 1:
        return ProbeResult(request.index, False, "video has no frames")
    indices = list(range(num_frames)) if request.mode == "full" else sorted({0, num_frames // 2, num_frames - 1})
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        return ProbeResult(request.index, False, f"decode failed: {type(error).__name__}: {_short(error)}")
    fps = float(reader.get_avg_fps())
    height, width = (int(size) for size in frames.shape[1:3])
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
    }
    return ProbeResult(request.index, True, info=info)


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
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
    probe_fn = resolve_probe_fn(probe_fn_spec)
    while True:
        request = connection.recv()
        if request is None:
            return
        try:
            result = probe_fn(request)
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
