"""Video decoding (decord, torchcodec or PyAV), mp4 writing (PyAV libx264) and clip frame-index sampling.

Decoders, in the order ``decoder="auto"`` tries them: decord (fast random access with ``get_batch``; x86_64 Linux
wheels only, unmaintained), torchcodec (PyTorch's maintained decoder; needs the wheel matching the installed torch and
FFmpeg 4-8 shared libraries on the system) and PyAV (bundles FFmpeg, every platform). ``resolve_decoder`` picks one
and says why; ``log_decoder_choice`` logs that once per process; asking for a decoder that is not there raises
``DecoderUnavailableError`` naming the package to install. Frame sampling follows the OpenVid-1M paper (16 frames at
stride 3, uniform fallback when a clip is too short) and the ``1 + 4k`` frame rule of causal video VAEs.

Memory: a video is decoded from where it lies, never read into memory first. A path is opened by the decoder; a tar
shard member or a stored zip member is a ``FileSlice`` (file, offset, size) opened through FFmpeg's ``subfile``
protocol, so only the packets the decoder needs are read and peak memory does not grow with the file size (decord's
own decode state does grow with very long files; PyAV's does not: ``benchmarks/data_memory.py``). ``bytes`` are still
accepted (decord copies them once more). PyAV keeps only the requested frames while it scans.
Checked by ``tests/data/test_video_loaders.py`` and ``tests/data/test_decoders.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

DecoderName = Literal["decord", "torchcodec", "pyav"]
Decoder = Literal["auto", "decord", "torchcodec", "pyav"]
Backend = Decoder  # the earlier name

#: What ``decoder="auto"`` tries, in order.
DECODERS: tuple[DecoderName, ...] = ("decord", "torchcodec", "pyav")
DECODER_LABELS = {"decord": "decord", "torchcodec": "torchcodec", "pyav": "PyAV"}
_PACKAGES = {"decord": "decord", "torchcodec": "torchcodec", "pyav": "av"}
_INSTALL_HINTS = {
    "decord": "`pip install decord` (wheels for x86_64 Linux only)",
    "torchcodec": (
        "`pip install torchcodec` at the version made for the installed torch (torch 2.13 -> torchcodec 0.13) and "
        "FFmpeg 4-8 shared libraries (Debian: libavcodec59 libavformat59 libavutil57 libavdevice59 libavfilter8 "
        "libswscale6 libswresample4)"
    ),
    "pyav": "`pip install av` (wheels with FFmpeg for every platform)",
}

#: The one logger of decoder choices (``genvis-shards`` shows it without ``-v``).
decoder_logger = logging.getLogger("genvis.data.decoder")


@dataclass(frozen=True)
class FileSlice:
    """A whole video stored as a byte range of a local file: a tar shard member or an uncompressed zip member.

    Args:
        path: the file holding the video.
        offset: first byte of the video in ``path``.
        size: bytes of the video.
    """

    path: str
    offset: int
    size: int

    def url(self) -> str:
        """FFmpeg ``subfile`` URL of the range (decord and PyAV open it like a file, reading only what they need)."""
        return f"subfile,,start,{self.offset},end,{self.offset + self.size},,:{os.path.abspath(self.path)}"

    def read(self) -> bytes:
        """The video's bytes (loads the whole range: for small members and tests only)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)

    def head(self, size: int = 512) -> bytes:
        """The first ``size`` bytes (container sniffing)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(min(size, self.size))


VideoSource = str | Path | bytes | FileSlice


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts of a decoded video.

    Args:
        num_frames: number of frames the decoder reports.
        fps: average frame rate.
        width: frame width in pixels.
        height: frame height in pixels.
    """

    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


class DecoderUnavailableError(ImportError):
    """The decoder asked for (or, for ``auto``, every decoder) cannot be used here; the message names the package."""


def has_decord() -> bool:
    """Whether ``decord`` is importable (x86_64 Linux wheels only)."""
    return decoder_problem("decord") is None


# torchcodec failures to load (missing FFmpeg libraries, a wheel built for another torch), by sys.path: loading it
# again costs a torch import and an FFmpeg search each time.
_LOAD_FAILURES: dict[tuple[str, ...], str] = {}


def decoder_problem(name: DecoderName) -> str | None:
    """Why decoder ``name`` cannot be used on this machine (``"not installed"``, ``"does not load: ..."``), or None.

    decord and PyAV are checked by finding the package (cheap, no import); torchcodec is imported, because an
    installed torchcodec fails to load without FFmpeg's shared libraries or with a torch it was not built for.
    """
    package = _PACKAGES[name]
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "not installed"
    if name != "torchcodec":
        return None
    cache_key = tuple(sys.path)
    if cache_key in _LOAD_FAILURES:
        return _LOAD_FAILURES[cache_key]
    try:
        importlib.import_module("torchcodec.decoders")
    except Exception as error:  # RuntimeError / OSError from the FFmpeg or torch library loader
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        _LOAD_FAILURES[cache_key] = f"installed but does not load ({type(error).__name__}: {first_line})"
        return _LOAD_FAILURES[cache_key]
    return None


def available_decoders() -> list[DecoderName]:
    """The decoders that work here, in ``auto`` order."""
    return [name for name in DECODERS if decoder_problem(name) is None]


def resolve_decoder(decoder: str = "auto") -> tuple[DecoderName, str]:
    """The decoder to use and why: ``("decord", "auto: the default")``, ``("pyav", "auto: decord is not installed,
    torchcodec is not installed")``, ``("torchcodec", "requested")``.

    Raises:
        ValueError: ``decoder`` is not one of ``auto``, ``decord``, ``torchcodec``, ``pyav``.
        DecoderUnavailableError: the requested decoder (for ``auto``: every decoder) cannot be used; the message names
            the missing package, how to install it and what is available instead.
    """
    if decoder not in ("auto", *DECODERS):
        raise ValueError(f"decoder: expected one of 'auto', 'decord', 'torchcodec', 'pyav', got {decoder!r}")
    if decoder != "auto":
        problem = decoder_problem(decoder)
        if problem is None:
            return decoder, "requested"
        others = [name for name in DECODERS if name != decoder and decoder_problem(name) is None]
        raise DecoderUnavailableError(
            f"decoder {decoder!r} was requested but the {_PACKAGES[decoder]!r} package is {problem}; install "
            f"{_INSTALL_HINTS[decoder]}, or pick one that is available here: "
            + (", ".join(repr(name) for name in others) if others else "none")
            + " (or 'auto')"
        )
    skipped = []
    for name in DECODERS:
        problem = decoder_problem(name)
        if problem is None:
            return name, "auto: the default" if not skipped else "auto: " + ", ".join(skipped)
        skipped.append(f"{name} is {problem}")
    raise DecoderUnavailableError(
        f"no video decoder: {', '.join(skipped)}; install one: {_INSTALL_HINTS['pyav']} or {_INSTALL_HINTS['decord']}"
    )


_LOGGED_CHOICES: set[tuple[str, str, str]] = set()


def log_decoder_choice(where: str, decoder: str = "auto") -> DecoderName:
    """Resolve ``decoder`` and log one INFO line on ``genvis.data.decoder`` naming the choice and why, e.g.
    ``video loader: decoding videos with PyAV (auto: decord is not installed, torchcodec is not installed)``; once
    per process for the same choice.

    Args:
        where: who decodes, e.g. ``"genvis-shards build: probes"`` or ``"video loader"``.
        decoder: ``auto`` or a decoder name.

    Raises:
        DecoderUnavailableError: see ``resolve_decoder``.
    """
    name, why = resolve_decoder(decoder)
    if (where, name, why) not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add((where, name, why))
        decoder_logger.info("%s: decoding videos with %s (%s)", where, DECODER_LABELS[name], why)
    return name


def _as_file(source: VideoSource) -> str | io.BytesIO:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source)
    if isinstance(source, FileSlice):
        if source.size < 1:
            raise ValueError(f"{source.path}: empty video member (0 bytes at offset {source.offset})")
        return source.url()
    return str(source)


def open_decord(source: VideoSource, num_threads: int = 1):
    """A ``decord.VideoReader`` on a path, a ``FileSlice`` (streamed) or in-memory bytes (copied by decord)."""
    import decord

    return decord.VideoReader(_as_file(source), ctx=decord.cpu(0), num_threads=num_threads)


def video_info(source: VideoSource, decoder: Decoder = "auto") -> VideoInfo:
    """Frame count, fps and size of ``source`` without decoding every frame."""
    name = resolve_decoder(decoder)[0]
    if name == "decord":
        reader = open_decord(source)
        height, width = reader[0].shape[:2]
        return VideoInfo(len(reader), float(reader.get_avg_fps()), int(width), int(height))
    if name == "torchcodec":
        metadata = open_torchcodec(source).metadata
        return VideoInfo(
            int(metadata.num_frames or 0),
            float(metadata.average_fps or 0.0),
            int(metadata.width),
            int(metadata.height),
        )
    import av

    with av.open(_as_file(source)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        # Count packets when the container has no frame count (webm, mkv): demuxing reads no frame data into memory.
        num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        rate = stream.average_rate or stream.guessed_rate or 0
        return VideoInfo(
            int(num_frames), float(rate), int(stream.codec_context.width), int(stream.codec_context.height)
        )


def open_torchcodec(source: VideoSource, num_threads: int = 1):
    """A ``torchcodec.decoders.VideoDecoder`` (exact seek mode: frame counts from a scan, as decord's) on a path, a
    ``FileSlice`` (streamed through ``subfile``) or in-memory bytes."""
    from torchcodec.decoders import VideoDecoder

    target = _as_file(source)
    if isinstance(target, io.BytesIO):
        target = target.getvalue()
    try:
        return VideoDecoder(target, seek_mode="exact", num_ffmpeg_threads=num_threads, dimension_order="NHWC")
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(f"torchcodec cannot open the video: {error}") from error


def read_frames(
    source: VideoSource,
    indices: list[int] | np.ndarray | None = None,
    decoder: Decoder = "auto",
    num_threads: int = 1,
) -> np.ndarray:
    """Decode frames ``indices`` (all frames when None) of ``source`` as a ``(T, H, W, 3)`` uint8 RGB array.

    Args:
        decoder: ``auto`` (decord, else torchcodec, else PyAV), or one of them by name.

    Raises:
        IndexError: an index is outside ``[0, num_frames)``.
        DecoderUnavailableError: the requested decoder is not installed (the message names the package).
    """
    name = resolve_decoder(decoder)[0]
    if name == "torchcodec":
        return _read_frames_torchcodec(source, indices, num_threads)
    if name == "decord":
        reader = open_decord(source, num_threads=num_threads)
        total = len(reader)
        wanted = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64)
        _check_indices(wanted, total)
        frames = reader.get_batch(wanted.tolist()).asnumpy()
        # decord #197/#208: get_batch can keep decoder state growing; seek(0) releases it before the reader dies.
        reader.seek(0)
        del reader
        return frames
    return _read_frames_pyav(source, indices)


def _read_frames_torchcodec(
    source: VideoSource, indices: list[int] | np.ndarray | None, num_threads: int
) -> np.ndarray:
    reader = open_torchcodec(source, num_threads=num_threads)
    total = int(reader.metadata.num_frames or len(reader))
    wanted = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64)
    _check_indices(wanted, total)
    if not wanted.size:
        return np.zeros((0, 0, 0, 3), np.uint8)
    try:
        batch = reader.get_frames_at(wanted.tolist())
    except (RuntimeError, ValueError, IndexError) as error:
        raise RuntimeError(f"torchcodec decode failed: {error}") from error
    return batch.data.numpy()


def _check_indices(indices: np.ndarray, total: int) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= total):
        raise IndexError(
            f"frame indices: expected values in [0, {total}), got min {indices.min()} max {indices.max()}"
        )


def _read_frames_pyav(source: VideoSource, indices: list[int] | np.ndarray | None) -> np.ndarray:
    """Scan the stream once, keeping only the wanted frames (memory: the output, not the video)."""
    import av

    wanted = None if indices is None else np.asarray(indices, dtype=np.int64)
    if wanted is not None and wanted.size and wanted.min() < 0:
        raise IndexError(f"frame indices: expected values >= 0, got min {wanted.min()}")
    needed = None if wanted is None else set(wanted.tolist())
    last = None if wanted is None else (int(wanted.max()) if wanted.size else -1)
    kept: dict[int, np.ndarray] = {}
    total = 0
    with av.open(_as_file(source)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # A sequential scan is as fast as seeking for short clips (specs/perf_reliability_ecosystem.md §A7).
        for frame in container.decode(stream):
            if needed is None or total in needed:
                kept[total] = frame.to_ndarray(format="rgb24")
            total += 1
            if last is not None and total > last:
                break
    if not total:
        raise ValueError("video has no decodable frames")
    if wanted is None:
        return np.stack([kept[i] for i in range(total)])
    if wanted.size and wanted.max() >= total:
        raise IndexError(f"frame indices: expected values in [0, {total}), got max {wanted.max()}")
    return np.stack([kept[i] for i in wanted.tolist()]) if wanted.size else np.zeros((0, 0, 0, 3), np.uint8)


_MAGIC_EXTENSIONS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"OggS", "ogv"),
    (0, b"FLV", "flv"),
    (0, b"\x00\x00\x01\xba", "mpg"),
    (0, b"\x30\x26\xb2\x75", "wmv"),
)


def container_extension(head: bytes) -> str | None:
    """File extension naming the container of a video whose first bytes are ``head`` (512 are plenty), or None.

    mp4 (ISO base media), mov (QuickTime brand or atoms without ``ftyp``), webm / mkv (EBML DocType), avi, MPEG-TS,
    MPEG-PS, Ogg, FLV and ASF are recognised from their magic numbers.
    """
    if head[4:8] == b"ftyp":
        return "mov" if head[8:12] == b"qt  " else "mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in head else "mkv"
    if head[:4] == b"RIFF":
        return "avi" if head[8:12] == b"AVI " else None
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "ts"
    for offset, magic, extension in _MAGIC_EXTENSIONS:
        if head[offset : offset + len(magic)] == magic:
            return extension
    return None


def write_mp4(
    destination: str | Path | io.BytesIO,
    frames: np.ndarray,
    fps: float = 8.0,
    crf: int = 18,
    gop: int = 8,
    faststart: bool = False,
) -> None:
    """Encode ``(T, H, W, 3)`` uint8 RGB ``frames`` as H.264 (yuv420p) mp4 with PyAV's bundled libx264.

    Args:
        destination: file path or a binary buffer.
        frames: the clip; H and W must be even (yuv420p halves chroma).
        fps: frame rate written into the stream.
        crf: libx264 constant rate factor (lower is better quality; 18 is visually lossless).
        gop: keyframe interval in frames; short GOPs keep random access cheap.
        faststart: put the ``moov`` index before the media data (streamable mp4).
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected (T, H, W, 3) uint8, got shape {frames.shape} dtype {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames: yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    from fractions import Fraction

    target = destination if isinstance(destination, io.BytesIO) else str(destination)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(target, mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "g": str(gop), "preset": "fast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 18, gop: int = 8) -> bytes:
    """``write_mp4`` into memory and return the mp4 bytes."""
    buffer = io.BytesIO()
    write_mp4(buffer, frames, fps=fps, crf=crf, gop=gop)
    return buffer.getvalue()


def causal_vae_num_frames(num_frames: int) -> int:
    """Largest ``1 + 4k`` not above ``num_frames``: a causal video VAE keeps frame 0 and compresses the rest by 4."""
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    return 1 + 4 * ((num_frames - 1) // 4)


def sample_frame_indices(
    total_frames: int,
    num_frames: int,
    stride: int = 1,
    rng: np.random.Generator | None = None,
    position: Literal["random", "start", "center"] = "random",
) -> np.ndarray:
    """Indices of a clip of ``num_frames`` frames taken every ``stride`` frames from a video of ``total_frames``.

    The clip start is random (``rng``), the first frame or centred. When the video is shorter than the clip span
    ``(num_frames - 1) * stride + 1``, it falls back to ``num_frames`` indices spread uniformly over the whole video
    (OpenVid-1M's rule), repeating frames only when the video has fewer than ``num_frames`` frames.

    Returns:
        ``(num_frames,)`` int64 array, non-decreasing, in ``[0, total_frames)``.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames: expected >= 1, got {total_frames}")
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride: expected >= 1, got num_frames={num_frames} stride={stride}")
    if position not in ("random", "start", "center"):
        raise ValueError(f"position: expected 'random', 'start' or 'center', got {position!r}")
    span = (num_frames - 1) * stride + 1
    if span > total_frames:
        return np.linspace(0, total_frames - 1, num_frames).round().astype(np.int64)
    slack = total_frames - span
    if position == "start":
        start = 0
    elif position == "center":
        start = slack // 2
    else:
        start = int((rng or np.random.default_rng()).integers(0, slack + 1))
    return start + stride * np.arange(num_frames, dtype=np.int64)
