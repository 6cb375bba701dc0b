"""``genvis-shards verify``: read shards back with plain webdataset and check them against ``manifest.json``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import webdataset as wds

from data_pipelines.build import read_manifest
from genvis.data.schema import SHARD_EXTS
from genvis.data.video import read_frames


def verify_shards(shard_dir: str | Path, decode: bool = False) -> str:
    """Check every shard's sha256, sample count and members (and decode each mp4 when ``decode``).

    Returns:
        A one-line summary.

    Raises:
        ValueError: listing every mismatch (shard, key, expected vs got).
    """
    folder = Path(shard_dir)
    manifest = read_manifest(folder)
    problems: list[str] = []
    total = 0
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            problems.append(f"{path}: sha256 expected {entry['sha256']}, got {digest}")
        count = 0
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            count += 1
            missing = [ext for ext in SHARD_EXTS if ext not in sample]
            if missing:
                problems.append(f"{path} key {sample['__key__']}: missing members {missing}")
            elif decode:
                try:
                    read_frames(sample["mp4"], [0])
                except (RuntimeError, ValueError) as error:
                    problems.append(f"{path} key {sample['__key__']}: mp4 does not decode ({error})")
        if count != entry["count"]:
            problems.append(f"{path}: expected {entry['count']} samples, got {count}")
        total += count
    if total != manifest["num_samples"]:
        problems.append(f"{folder}: manifest says {manifest['num_samples']} samples, shards hold {total}")
    if problems:
        raise ValueError(f"{folder}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return f"{folder}: OK, {total} samples in {len(manifest['shards'])} shards match {folder / 'manifest.json'}"
