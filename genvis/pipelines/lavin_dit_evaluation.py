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

__all__ = ["BINARY_MAP_TASKS", "InContextScore", "episode_grid_row", "evaluate_in_context", "psnr"]

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
    num_inference_steps: int = 10,
    guidance_scale: float = 1.5,
    seed: int = 0,
    return_predictions: bool = False,
) -> dict[str, InContextScore] | tuple[dict[str, InContextScore], list[torch.Tensor]]:
    """Score the pipeline on ``episodes`` (``genvis.tasks.Episode``-like), grouped by task.

    Args:
        pipeline: a :class:`~genvis.pipelines.LaVinDiTPipeline`.
        episodes: episodes with ``task``, ``context_pairs``, ``query``, ``query_target``.
        num_inference_steps: Euler steps per answer.
        guidance_scale: CFG weight.
        seed: episode ``i`` uses ``torch.Generator().manual_seed(seed + i)``.
        return_predictions: also return the ``(3, T, H, W)`` answers in [-1, 1].
    """
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    predictions = []
    for index, episode in enumerate(episodes):
        frames = pipeline(
            episode.context_pairs,
            episode.query,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed + index),
            output_type="pt",
        ).frames  # (T, 3, H, W) in [0, 1]
        answer = frames.transpose(0, 1) * 2 - 1  # (3, T, H, W) in [-1, 1]
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


def episode_grid_row(episode, prediction: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One sample-grid row: ``[in_1, tgt_1, ..., query, prediction, truth]`` (middle frame of each clip)."""
    clips = [clip for pair in episode.context_pairs for clip in pair] + [episode.query]
    if prediction is not None:
        clips.append(prediction)
    clips.append(episode.query_target)
    return [clip[:, clip.shape[1] // 2] for clip in clips]  # (3, H, W) in [-1, 1]
