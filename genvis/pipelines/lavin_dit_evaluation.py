"""In-context evaluation of a :class:`LaVinDiTPipeline` on ``genvis.tasks`` episodes, against copy-the-input.

For every episode the pipeline answers the query from its context pairs; the answer is scored against the exact
target with PSNR (all tasks, pixels in [-1, 1], peak-to-peak 2) and, for binary-map tasks, IoU of the decoded maps.
The *copy-the-input* baseline scores the query itself as the answer: a model that learned nothing from the pairs
cannot beat it on tasks whose target resembles the input. Used by ``train/lavin_dit.py`` and
tests/lavin/test_train_lavin_dit.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from genvis.tasks import decode_binary_map
from genvis.vae.losses import psnr as clip_psnr

__all__ = [
    "BINARY_MAP_TASKS",
    "InContextScore",
    "RelianceScore",
    "episode_grid_row",
    "evaluate_in_context",
    "evaluate_reliance",
    "psnr",
]

# tasks whose target is a binary map (white = positive), scored with IoU as well
BINARY_MAP_TASKS: frozenset[str] = frozenset(
    {"foreground_segmentation", "edge_detection", "video_foreground_segmentation"}
)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of one clip in [-1, 1] (peak 1 on the [0, 1] scale; ``genvis.vae.losses.psnr``)."""
    return float(clip_psnr(prediction[None], target[None])[0])


def binary_iou(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of the decoded binary maps of two ``(3, T, H, W)`` clips (1.0 when both are empty)."""
    pred, true = decode_binary_map(prediction), decode_binary_map(target)
    union = (pred | true).sum()
    return 1.0 if union == 0 else float((pred & true).sum() / union)


@dataclass
class InContextScore:
    """Mean scores of one task.

    Args:
        task: task name.
        count: episodes scored.
        psnr: model PSNR (dB).
        psnr_copy: copy-the-input PSNR (dB).
        iou: model IoU (binary-map tasks, else None).
        iou_copy: copy-the-input IoU (binary-map tasks, else None).
    """

    task: str
    count: int
    psnr: float
    psnr_copy: float
    iou: float | None = None
    iou_copy: float | None = None

    @property
    def beats_copy(self) -> bool:
        if self.iou is not None:
            return self.iou > self.iou_copy
        return self.psnr > self.psnr_copy


@torch.no_grad()
def evaluate_in_context(
    pipeline,
    episodes: Sequence,
    *,
    num_inference_steps: int | None = None,
    time_grid: str | None = None,
    guidance_scale: float = 1.5,
    seed: int = 0,
    return_predictions: bool = False,
) -> dict[str, InContextScore] | tuple[dict[str, InContextScore], list[torch.Tensor]]:
    """Score the pipeline on ``episodes`` (``genvis.tasks.Episode``-like), grouped by task.

    Args:
        pipeline: a :class:`~genvis.pipelines.LaVinDiTPipeline`.
        episodes: episodes with ``task``, ``context_pairs``, ``query``, ``query_target``.
        num_inference_steps: Euler steps per answer on a uniform grid; None (and no ``time_grid``): the pipeline's
            default, the official 20-point grid.
        time_grid: an official grid by name (``"lavin-20"``, ``"lavin-30"``, ``"lavin-40"``).
        guidance_scale: CFG weight.
        seed: episode ``i`` uses ``torch.Generator().manual_seed(seed + i)``.
        return_predictions: also return the ``(3, T, H, W)`` answers in [-1, 1].
    """
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    predictions = []
    sampling = {"num_inference_steps": num_inference_steps, "time_grid": time_grid, "guidance_scale": guidance_scale}
    for index, episode in enumerate(episodes):
        answer = _answer(pipeline, episode.context_pairs, episode.query, seed + index, sampling)
        target, query = episode.query_target.float(), episode.query.float()
        scores = sums[episode.task]
        scores["count"] += 1
        scores["psnr"] += psnr(answer, target)
        scores["psnr_copy"] += psnr(query, target) if query.shape == target.shape else 0.0
        if episode.task in BINARY_MAP_TASKS:
            scores["iou"] += binary_iou(answer, target)
            scores["iou_copy"] += binary_iou(query, target)
        if return_predictions:
            predictions.append(answer)
    result = {}
    for task, scores in sums.items():
        n = scores["count"]
        binary = task in BINARY_MAP_TASKS
        result[task] = InContextScore(
            task,
            int(n),
            scores["psnr"] / n,
            scores["psnr_copy"] / n,
            scores["iou"] / n if binary else None,
            scores["iou_copy"] / n if binary else None,
        )
    return (result, predictions) if return_predictions else result


def _answer(pipeline, context_pairs, query, seed: int, sampling: dict) -> torch.Tensor:
    """One pipeline answer as a ``(3, T, H, W)`` clip in [-1, 1] (noise seeded by ``seed``)."""
    frames = pipeline(
        context_pairs, query, generator=torch.Generator().manual_seed(seed), output_type="pt", **sampling
    ).frames  # (T, 3, H, W) in [0, 1]
    return frames.transpose(0, 1) * 2 - 1


@dataclass
class RelianceScore:
    """How often the answers depend on the right inputs (held-out episodes; chance 0.5 for a random answer).

    Args:
        context_hits: queries whose answer with their own task's context is closer (PSNR) to their target than the
            answer with another task's context (same noise seed). A model that ignores its context gives identical
            answers and scores 0 (ties are misses).
        context_total: such comparisons.
        query_hits: answers closer to their own query's target than to another query's target of the same task.
        query_total: such comparisons.
        per_task: ``{task: {"context": rate, "query": rate}}``.
    """

    context_hits: int
    context_total: int
    query_hits: int
    query_total: int
    per_task: dict[str, dict[str, float]]

    @property
    def context_rate(self) -> float:
        return self.context_hits / max(1, self.context_total)

    @property
    def query_rate(self) -> float:
        return self.query_hits / max(1, self.query_total)


@torch.no_grad()
def evaluate_reliance(
    pipeline,
    episodes: Sequence,
    predictions: Sequence[torch.Tensor],
    *,
    num_inference_steps: int | None = None,
    time_grid: str | None = None,
    guidance_scale: float = 1.5,
    seed: int = 0,
) -> RelianceScore:
    """Context and query reliance of the answers ``predictions`` (from :func:`evaluate_in_context` with the same seed).

    Context: episode ``j`` of task ``a`` is answered again with the context pairs of an episode of another task ``b``
    (``b`` rotates over every other task as ``j`` grows; same noise seed as its own answer), and counts as a hit when
    its own-context answer is strictly closer to its target. Query: the own answer counts as a hit when it is strictly
    closer to its own target than to the target of the next episode of the same task. Needs >= 2 tasks (context) and
    >= 2 episodes per task (query).
    """
    if len(predictions) != len(episodes):
        raise ValueError(f"got {len(predictions)} predictions for {len(episodes)} episodes")
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, episode in enumerate(episodes):
        by_task[episode.task].append(index)
    tasks = list(by_task)
    if len(tasks) < 2 or min(len(v) for v in by_task.values()) < 2:
        raise ValueError(
            "evaluate_reliance needs >= 2 tasks with >= 2 episodes each, got "
            + ", ".join(f"{task}: {len(v)}" for task, v in by_task.items())
        )
    sampling = {"num_inference_steps": num_inference_steps, "time_grid": time_grid, "guidance_scale": guidance_scale}
    hits: dict[str, dict[str, int]] = {task: {"context": 0, "query": 0, "n": 0} for task in tasks}
    for position, task in enumerate(tasks):
        members = by_task[task]
        for j, index in enumerate(members):
            episode, own = episodes[index], predictions[index]
            own_psnr = psnr(own, episode.query_target)
            other_task = tasks[(position + 1 + j % (len(tasks) - 1)) % len(tasks)]
            donor = episodes[by_task[other_task][j % len(by_task[other_task])]]
            swapped = _answer(pipeline, donor.context_pairs, episode.query, seed + index, sampling)
            hits[task]["context"] += own_psnr > psnr(swapped, episode.query_target)
            other = episodes[members[(j + 1) % len(members)]]
            hits[task]["query"] += own_psnr > psnr(own, other.query_target)
            hits[task]["n"] += 1
    per_task = {t: {"context": h["context"] / h["n"], "query": h["query"] / h["n"]} for t, h in hits.items()}
    total = sum(h["n"] for h in hits.values())
    return RelianceScore(
        sum(h["context"] for h in hits.values()), total, sum(h["query"] for h in hits.values()), total, per_task
    )


def episode_grid_row(episode, prediction: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One sample-grid row: ``[in_1, tgt_1, ..., query, prediction, truth]`` (middle frame of each clip)."""
    clips = [clip for pair in episode.context_pairs for clip in pair] + [episode.query]
    if prediction is not None:
        clips.append(prediction)
    clips.append(episode.query_target)
    return [clip[:, clip.shape[1] // 2] for clip in clips]  # (3, H, W) in [-1, 1]
