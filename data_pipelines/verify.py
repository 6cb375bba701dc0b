"""``genvis-shards verify``: read shards back with plain webdataset and check them against ``manifest.json``.

Every shard is checked even when an earlier one is damaged (truncated, a flipped bit in a tar header, a changed
file): the report lists each problem (shard, key, expected vs got) and the command exits non-zero.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import webdataset as wds

from data_pipelines.build import read_manifest
from genvis.data.schema import CAPTION_EXT, METADATA_EXT, VIDEO_EXTS
from genvis.data.video import log_decoder_choice, read_frames


class ShardVerificationError(ValueError):
    """Shards that do not match their manifest; the message lists every problem found."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sample(path: Path, sample: dict[str, Any], decoder: str | None) -> list[str]:
    key = sample.get("__key__", "?")
    video = [ext for ext in VIDEO_EXTS if ext in sample]
    missing = [ext for ext in (METADATA_EXT, CAPTION_EXT) if ext not in sample] + ([] if video else ["video"])
    if missing:
        found = sorted(name for name in sample if not name.startswith("__"))
        return [f"{path} key {key}: missing members {missing}, got {found}"]
    if decoder:
        try:
            read_frames(sample[video[0]], [0], decoder=decoder)
        except (RuntimeError, ValueError, IndexError) as error:
            return [f"{path} key {key}: {video[0]} does not decode ({type(error).__name__}: {error})"]
    return []


def _check_shard(path: Path, entry: dict[str, Any], decoder: str | None) -> tuple[list[str], int]:
    """Problems of one shard and the samples it yielded."""
    if not path.is_file():
        return [f"{path}: missing"], 0
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{path}: size expected {entry['bytes']} bytes, got {size}")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        problems.append(f"{path}: sha256 expected {entry['sha256']}, got {digest}")
    errors: list[str] = []

    def collect(error: Exception) -> bool:
        # webdataset appends " @ <file object>" to the message or passes (message, file, url) as args.
        first = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
        message = f"{type(error).__name__}: {first.split(' @ <')[0]}"
        if message not in errors:
            errors.append(message)
        return True  # note it and go on: every shard gets checked

    keys = []
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, handler=collect)
    for sample in dataset:
        keys.append(sample.get("__key__", "?"))
        problems += _check_sample(path, sample, decoder)
    problems += [f"{path}: unreadable tar ({error})" for error in errors]
    if len(keys) != entry["count"]:
        problems.append(f"{path}: expected {entry['count']} samples, got {len(keys)}")
    if keys and (keys[0], keys[-1]) != (entry.get("first_key", keys[0]), entry.get("last_key", keys[-1])):
        problems.append(f"{path}: keys expected {entry['first_key']}..{entry['last_key']}, got {keys[0]}..{keys[-1]}")
    return problems, len(keys)


def verify_shards(shard_dir: str | Path, decode: bool = False, decoder: str = "auto") -> str:
    """Check every shard's size, sha256, tar structure, sample count, keys and members (and decode each video's
    first frame with ``decoder`` when ``decode``).

    Returns:
        A one-line summary.

    Raises:
        ShardVerificationError: listing every problem of every shard (shard, key, expected vs got).
    """
    folder = Path(shard_dir)
    manifest = read_manifest(folder)
    chosen = log_decoder_choice("genvis-shards verify --decode", decoder) if decode else None
    problems: list[str] = []
    damaged: list[str] = []
    total = 0
    for entry in manifest["shards"]:
        shard_problems, count = _check_shard(folder / entry["name"], entry, chosen)
        problems += shard_problems
        damaged += [entry["name"]] if shard_problems else []
        total += count
    if total != manifest["num_samples"]:
        problems.append(f"{folder}: manifest says {manifest['num_samples']} samples, shards hold {total}")
    if problems:
        raise ShardVerificationError(
            f"{folder}: {len(damaged)} of {len(manifest['shards'])} shards damaged ({', '.join(damaged)}), "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    return f"{folder}: OK, {total} samples in {len(manifest['shards'])} shards match {folder / 'manifest.json'}"
