"""``genvis-shards build --engine ray``: probe the rows on a Ray cluster, in partitions, and write the shards as the
single-process build does.

The rows are cut into partitions of ``partition_size`` consecutive row indices (partition ``p`` holds rows
``[p * size, (p + 1) * size)``, whatever was finished before). Each partition is one Ray task: it probes its rows in a
``ProbePool`` of its own (one spawned worker, so the per-video timeout and crash isolation are those of a local
build) and returns the results. The driver appends every finished partition's results to the probe journal
(``.build_probes.jsonl`` in ``--out``) and feeds them, in row order, to the same shard writer as a local build: the
shards are byte for byte those of ``--engine local``. A re-run (after a kill, a lost node, Ctrl-C) reads the probe
journal and runs only the partitions it lacks: a partition is the unit of resume; the shards themselves resume from
the shard journal like a local build's.

The cluster: ``ray_address`` (``--ray-address``; ``auto`` joins the cluster ``ray start`` made on this node, or
``RAY_ADDRESS``); without one a local Ray instance with ``num_workers`` CPUs is started for the build and stopped
after it. Every node must see ``--video-root`` and the row file under the same paths (a shared file system or URLs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipelines.build import _append_journal, _journal_records
from data_pipelines.probe import ProbePool, ProbeRequest, ProbeResult

logger = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'ray==2.60.0' (or pip install -e '.[ray]')"


class RayUnavailableError(RuntimeError):
    """``--engine ray`` was asked for and Ray cannot be imported or reached."""


def import_ray() -> Any:
    """The ``ray`` module; raises RayUnavailableError naming the package and how to install it."""
    try:
        import ray
    except ImportError as error:
        raise RayUnavailableError(
            f"--engine ray needs the 'ray' package, which does not import ({error}); install it with {RAY_INSTALL}, "
            "or build with --engine local (or --part I/N on a slurm array)"
        ) from None
    return ray


def _probe_partition(requests: list[ProbeRequest], timeout_s: float, probe_fn: str) -> list[ProbeResult]:
    """Run on a Ray worker: probe one partition's rows in a local ProbePool (timeouts and crashes contained)."""
    pool = ProbePool(1, timeout_s, probe_fn)
    try:
        return sorted(pool.imap_unordered(requests), key=lambda result: result.index)
    finally:
        pool.close()


# Failures that may be this machine's, not the video's: probed again on a re-run rather than kept.
_RETRIED = ("probe process crashed", "probe raised")


def _load_probe_journal(path: Path, header: dict[str, Any]) -> dict[int, ProbeResult]:
    """Results by row index from an earlier run with the same config and probe function (else none)."""
    if not path.is_file():
        return {}
    done: dict[int, ProbeResult] = {}
    for record in _journal_records(path, "probe-journal"):
        if record["type"] == "config":
            if record["header"] != header:
                logger.info("%s: made with other options or probe function; probing every row again", path)
                return {}
        elif record["type"] == "partition":
            for fields in record["results"]:
                result = ProbeResult(**fields)
                if not result.environment and not result.reason.startswith(_RETRIED):
                    done[result.index] = result
    return done


def _start(ray: Any, address: str | None, num_cpus: int) -> bool:
    """Connect to (or start) a cluster; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        options["address"] = address
    else:
        options["num_cpus"] = num_cpus
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise RayUnavailableError(f"--engine ray: cannot start or reach {where}: {error}") from None
    return True


def ray_probe_results(
    requests: list[ProbeRequest],
    *,
    probe_journal: Path,
    header: dict[str, Any],
    partition_size: int,
    timeout_s: float,
    probe_fn: str,
    address: str | None,
    num_cpus: int,
) -> Iterator[ProbeResult]:
    """Probe ``requests`` on Ray, one task per partition, yielding every result (unordered; match by ``index``).

    Rows whose results ``probe_journal`` holds under the same ``header`` (config fingerprint + probe function) are not
    probed again (except crashes, which may have been this machine's fault); every partition that finishes is
    appended to it before its results are yielded.
    """
    ray = import_ray()
    done = _load_probe_journal(probe_journal, header)
    if not done:
        probe_journal.write_text(json.dumps({"type": "config", "header": header}) + "\n", encoding="utf-8")
    partitions: dict[int, list[ProbeRequest]] = {}
    kept = 0
    for request in requests:
        if request.index in done:
            kept += 1
            yield done[request.index]
        else:
            partitions.setdefault(request.index // partition_size, []).append(request)
    todo = sorted(partitions)
    logger.info(
        "ray: %d partitions to probe (%d rows), %d rows' results kept from an earlier run",
        len(todo),
        len(requests) - kept,
        kept,
    )
    if not todo:
        return
    started = _start(ray, address, num_cpus)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_probe_partition)
        futures = {task.remote(partitions[number], timeout_s, probe_fn): number for number in todo}
        pending = list(futures)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            number = futures[finished[0]]
            results = ray.get(finished[0])
            _append_journal(
                probe_journal,
                {"type": "partition", "number": number, "results": [dataclasses.asdict(r) for r in results]},
            )
            yield from results
    finally:
        if started:
            ray.shutdown()
