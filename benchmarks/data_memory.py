"""Peak memory of the shard builder's probe, its shard writer and the loader: 64 MiB vs 1 GiB videos, one run.

Data: one real H.264 stream made long, not padded: a 32-frame 320x240 noise clip (lossless x264, ~110 KB per
frame) is remuxed over and over with shifted timestamps until the mp4 reaches the target size (64 MiB: ~600 frames,
1 GiB: ~9,700 frames). No re-encoding, so writing the files is I/O only.

Each measurement runs in a fresh process; it reports the process's peak RSS (``ru_maxrss``) above its RSS after the
imports, for:

- ``probe``: ``data_pipelines.probe.probe_video`` (decord opens the file by path, sparse first/middle/last frames).
- ``probe, bytes (peer)``: what the builder did before: read the file, wrap it in ``BytesIO``, decord copies it.
- ``build``: ``build_shards`` of a one-row CSV, main process (the shard writer streams the video into the tar); the
  probe worker's peak is shown as ``build worker``.
- ``loader``: one 16-frame clip through ``make_video_dataset`` (the tar member is decoded in place).
- ``loader, bytes (peer)``: plain ``webdataset.WebDataset`` (member read into memory) + decord from bytes.
- ``decode, decord`` / ``decode, torchcodec`` / ``decode, PyAV``: ``read_frames`` of the same 16 frames (400, 403,
  ..., 445) straight from the file's path, with each decoder: what the decoder itself holds, with no shard or loader
  around it. A decoder that is not installed prints ``n/a``.

``build worker`` is the probe worker's absolute peak RSS (``RUSAGE_CHILDREN``: imports included, no baseline taken).

The ratio big/small is the number to watch: 1.0 means memory does not grow with the file size. Needs ~2.5 GiB of
free disk under ``--workdir`` and, for the peers, ~4.5 GiB of RAM. Run: ``python benchmarks/data_memory.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

SIZES = {"64 MiB": 64 << 20, "1 GiB": 1 << 30}
CASES = (
    "probe",
    "probe_bytes",
    "build",
    "loader",
    "loader_bytes",
    "decode_decord",
    "decode_torchcodec",
    "decode_pyav",
)
LABELS = {
    "probe": "probe",
    "probe_bytes": "probe, bytes (peer)",
    "build": "build",
    "build_worker": "build worker (absolute)",
    "loader": "loader",
    "loader_bytes": "loader, bytes (peer)",
    "decode_decord": "decode, decord",
    "decode_torchcodec": "decode, torchcodec",
    "decode_pyav": "decode, PyAV",
}


def make_base_clip(path: Path, num_frames: int = 32, width: int = 320, height: int = 240) -> None:
    """A short incompressible H.264 clip (uniform noise, lossless, one GOP)."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast", "g": str(num_frames)}
        for _ in range(num_frames):
            frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())


def make_long_mp4(base: Path, target: Path, size: int) -> int:
    """Remux ``base``'s packets again and again (timestamps shifted) until ``target`` holds ``size`` bytes of
    video; returns the frame count."""
    import av

    with av.open(str(base)) as source:
        template = source.streams.video[0]
        packets = [(bytes(p), p.pts, p.dts, p.duration, p.is_keyframe) for p in source.demux(template) if p.size]
        time_base = template.time_base
        with av.open(str(target), mode="w", format="mp4") as output:
            stream = output.add_stream_from_template(template)
            span = max(pts for _, pts, _, _, _ in packets) + packets[0][3]
            written, frames, offset = 0, 0, 0
            while written < size:
                for data, pts, dts, duration, keyframe in packets:
                    packet = av.Packet(data)
                    packet.pts, packet.dts, packet.duration = pts + offset, dts + offset, duration
                    packet.time_base, packet.stream, packet.is_keyframe = time_base, stream, keyframe
                    output.mux(packet)
                    written += len(data)
                    frames += 1
                offset += span
    return frames


def _measure(case: str, video: Path, workdir: Path) -> dict[str, float]:
    """Run one case in this (fresh) process; peak RSS above the post-import baseline, in MiB."""
    import resource

    import decord
    import webdataset as wds

    from data_pipelines.build import BuildConfig, build_shards
    from data_pipelines.probe import ProbeRequest, VideoLocation, probe_video
    from genvis.data.loaders import ClipConfig, make_video_dataset
    from genvis.data.video import decoder_problem, read_frames

    def peak_mib(who: int = resource.RUSAGE_SELF) -> float:
        return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB

    baseline = peak_mib()
    shards = workdir / f"shards_{video.stem}"
    if case == "probe":
        result = probe_video(ProbeRequest(0, VideoLocation(str(video))))
        assert result.ok, result.reason
    elif case == "probe_bytes":
        import io

        reader = decord.VideoReader(io.BytesIO(video.read_bytes()), ctx=decord.cpu(0), num_threads=1)
        reader.get_batch(sorted({0, len(reader) // 2, len(reader) - 1})).asnumpy()
    elif case == "build":
        csv_path = workdir / f"{video.stem}.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["video", "caption"])
            writer.writerow([video.name, "uniform noise"])
        report = build_shards(
            BuildConfig(str(csv_path), str(video.parent), str(shards), num_workers=1), overwrite=True, progress=False
        )
        assert report.num_samples == 1, report.rejected
        return {"build": peak_mib() - baseline, "build_worker": peak_mib(resource.RUSAGE_CHILDREN)}
    elif case == "loader":
        clip = ClipConfig(num_frames=16, frame_stride=3, resolution_buckets=[(128, 128)])
        batches = list(make_video_dataset(shards, clip, batch_size=1, resampled=False, shuffle_buffer=0))
        assert len(batches) == 1
    elif case == "loader_bytes":
        sample = next(iter(wds.WebDataset(str(shards / "000000.tar"), shardshuffle=False, empty_check=False)))
        read_frames(sample["mp4"], list(range(0, 48, 3)), decoder="decord")
    elif case.startswith("decode_"):
        decoder = case.removeprefix("decode_")
        if decoder_problem(decoder) is not None:
            return {case: float("nan")}
        read_frames(video, list(range(400, 448, 3)), decoder=decoder)
    return {case: peak_mib() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="folder for the generated videos and shards (default: temp)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--video", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_measure(args.case, Path(args.video), Path(args.workdir))))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        workdir = Path(scratch)
        base = workdir / "base.mp4"
        make_base_clip(base)
        results: dict[str, dict[str, float]] = {}
        frames: dict[str, int] = {}
        for label, size in SIZES.items():
            videos = workdir / label.replace(" ", "")
            videos.mkdir()
            video = videos / f"long_{label.replace(' ', '')}.mp4"
            frames[label] = make_long_mp4(base, video, size)
            results[label] = {}
            for case in CASES:  # build before loader: the loader reads the built shard
                command = [sys.executable, __file__, "--case", case, "--video", str(video), "--workdir", str(workdir)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[label].update(json.loads(output.strip().splitlines()[-1]))
            print(f"{label}: {video.stat().st_size / 2**20:.0f} MiB, {frames[label]} frames", flush=True)
    small, big = SIZES
    print(f"\npeak RSS above the post-import baseline (MiB); ratio {big} / {small}")
    print(f"{'case':<24}{small:>10}{big:>10}{'ratio':>8}")
    for key, label in LABELS.items():
        low, high = results[small][key], results[big][key]
        if low != low:  # NaN: the decoder is not installed
            print(f"{label:<24}{'n/a':>10}{'n/a':>10}{'n/a':>8}")
            continue
        print(f"{label:<24}{low:>10.1f}{high:>10.1f}{high / max(low, 1e-9):>8.2f}")


if __name__ == "__main__":
    main()
