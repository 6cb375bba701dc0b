"""``genvis-shards merge``: combine the manifests of a ``--part I/N`` build into the folder's ``manifest.json``.

A slurm array runs ``genvis-shards build ... --out OUT --part $SLURM_ARRAY_TASK_ID/N`` for ``I = 0 .. N-1``; every
part writes ``partIofN-XXXXXX.tar`` shards, its own journal and ``manifest.partIofN.json`` into ``OUT``. When all N
have finished, ``merge`` checks that they belong together (one N, every part complete, the same options and row
file, contiguous blocks of records, every shard present at its recorded size) and writes ``manifest.json`` and
``rejected.csv`` listing all parts' shards in part order: the same samples, rejections and counts as a single-process
build of the same rows. The loaders and ``genvis-shards verify`` read the merged manifest like any other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from data_pipelines.build import PART_JOURNAL, OutputConflictError, OutputNames, write_manifest_files
from genvis.data.schema import JOURNAL_NAME, MANIFEST_NAME, REJECTED_NAME, SCHEMA_VERSION

PART_MANIFEST = re.compile(r"^manifest\.part(\d+)of(\d+)\.json$")


class MergeError(ValueError):
    """The part manifests cannot be merged (a part is missing or unfinished, or they do not belong together)."""


def _found_parts(folder: Path) -> tuple[set[tuple[int, int]], dict[tuple[int, int], str]]:
    journals, manifests = set(), {}
    for name in os.listdir(folder):
        if match := PART_JOURNAL.match(name):
            journals.add((int(match[1]), int(match[2])))
        elif match := PART_MANIFEST.match(name):
            manifests[(int(match[1]), int(match[2]))] = name
    return journals, manifests


def _check_owned(folder: Path) -> None:
    """``manifest.json`` / ``rejected.csv`` are replaced only when an earlier merge wrote them."""
    manifest = folder / MANIFEST_NAME
    merged_before = False
    if manifest.is_file():
        try:
            merged_before = "merged_from" in json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            merged_before = False
        if not merged_before:
            raise OutputConflictError(
                f"{manifest}: exists and was not written by `genvis-shards merge`; it is never overwritten: move it "
                "away or merge in a copy of the folder"
            )
    if (folder / REJECTED_NAME).exists() and not merged_before:
        raise OutputConflictError(
            f"{folder / REJECTED_NAME}: exists without a merged {MANIFEST_NAME}; it is never overwritten: move it away"
        )


def _without_part(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key != "part"}


def merge_parts(out_dir: str | Path) -> dict[str, Any]:
    """Merge the part manifests in ``out_dir`` into ``manifest.json`` + ``rejected.csv``; returns the manifest.

    Raises:
        FileNotFoundError: ``out_dir`` is not a folder.
        MergeError: no parts, parts of several N, a part missing or unfinished, parts built with other options or
            another row file, or a shard missing or changed since its part's manifest (each named).
        OutputConflictError: the folder holds a whole (non ``--part``) build, or a ``manifest.json`` /
            ``rejected.csv`` that no merge wrote (left untouched).
    """
    folder = Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if (folder / JOURNAL_NAME).is_file():
        raise OutputConflictError(
            f"{folder}: holds a whole (non --part) build ({JOURNAL_NAME}); its manifest.json needs no merge"
        )
    journals, manifests = _found_parts(folder)
    counts = sorted({count for _, count in journals | set(manifests)})
    if not counts:
        raise MergeError(
            f"{folder}: no part builds found (expected manifest.partIofN.json files); build them with "
            "`genvis-shards build ... --out <this folder> --part I/N` for I = 0 .. N-1"
        )
    if len(counts) > 1:
        listed = ", ".join(f"N = {count}" for count in counts)
        raise MergeError(f"{folder}: holds parts of different splits ({listed}); keep one split per folder")
    count = counts[0]
    problems = []
    for index in range(count):
        if (index, count) in manifests:
            continue
        names = OutputNames.for_part((index, count))
        if (index, count) in journals:
            problems.append(
                f"part {index}/{count}: not finished ({names.journal} but no {names.manifest}: still running or "
                f"interrupted; re-run its `genvis-shards build ... --part {index}/{count}` to resume)"
            )
        else:
            problems.append(f"part {index}/{count}: not built (no {names.manifest})")
    if problems:
        raise MergeError(f"{folder}: cannot merge {count} parts:\n  " + "\n  ".join(problems))

    parts = []
    for index in range(count):
        name = manifests[(index, count)]
        try:
            manifest = json.loads((folder / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MergeError(f"{folder / name}: not a readable manifest ({error})") from None
        part = manifest.get("part") or {}
        if (part.get("index"), part.get("count")) != (index, count) or manifest.get("status") != "complete":
            raise MergeError(
                f"{folder / name}: expected the complete manifest of part {index}/{count}, got part "
                f"{part.get('index')}/{part.get('count')} with status {manifest.get('status')!r}"
            )
        parts.append((name, manifest))

    first_name, first = parts[0]
    reference = _without_part(first["config"])
    for name, manifest in parts[1:]:
        config = _without_part(manifest["config"])
        if config != reference:
            differing = sorted(
                key for key in reference.keys() | config.keys() if reference.get(key) != config.get(key)
            )
            problems.append(f"{name}: built with other options or rows than {first_name} (differs in {differing})")
    expected_start, total = 0, first["part"]["records_in_file"]
    for name, manifest in parts:
        start, end = manifest["part"]["records"]
        if start != expected_start or manifest["part"]["records_in_file"] != total:
            problems.append(
                f"{name}: records {start}-{end} of {manifest['part']['records_in_file']}, expected to start at "
                f"{expected_start} of {total}"
            )
        expected_start = end
        for shard in manifest["shards"]:
            path = folder / shard["name"]
            if not path.is_file():
                problems.append(f"{name}: shard {path} is missing")
            elif path.stat().st_size != shard["bytes"]:
                problems.append(
                    f"{name}: shard {path} is {path.stat().st_size} bytes, its manifest says {shard['bytes']}"
                )
    if expected_start != total and not problems:
        problems.append(f"{parts[-1][0]}: the parts end at record {expected_start}, the row file has {total}")
    if problems:
        raise MergeError(f"{folder}: cannot merge {count} parts:\n  " + "\n  ".join(problems))

    _check_owned(folder)
    by_stage: dict[str, int] = {}
    for _, manifest in parts:
        for stage, number in manifest["rejected_by_stage"].items():
            by_stage[stage] = by_stage.get(stage, 0) + number
    rejected = sorted(
        (rejection for _, manifest in parts for rejection in manifest["rejected"]), key=lambda r: r["line"]
    )
    shards = [shard for _, manifest in parts for shard in manifest["shards"]]
    merged = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "csv": first["csv"],
        "video_root": first["video_root"],
        "config": reference,
        "decoder": ", ".join(sorted({manifest["decoder"] for _, manifest in parts})),
        "num_rows": sum(manifest["num_rows"] for _, manifest in parts),
        "num_samples": sum(manifest["num_samples"] for _, manifest in parts),
        "num_rejected": len(rejected),
        "rejected_by_stage": dict(sorted(by_stage.items())),
        "num_shards": len(shards),
        "total_bytes": sum(shard["bytes"] for shard in shards),
        "shards": shards,
        "rejected": rejected,
        "merged_from": [name for name, _ in parts],
    }
    write_manifest_files(folder, merged, MANIFEST_NAME, REJECTED_NAME)
    return merged
