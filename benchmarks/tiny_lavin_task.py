"""Shared harness of benchmarks/repa.py and benchmarks/optimizer_memory.py: the tiny LaVin-DiT in-context task.

A fixed pool of training episodes and a disjoint held-out set (built-in tasks, pixel-space latents), a training loop
with per-sample seeded time/noise (identical across the runs being compared), and a held-out flow-matching loss with
fixed times and noise (the number the benchmarks compare; the REPA term is never included in it).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from genvis.diffusion import RectifiedFlow, encode_episodes, sample_generators
from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
from genvis.tasks import TaskMixture

TASKS = ["depth_order", "edge_detection", "colorization", "foreground_segmentation"]


@dataclass
class TinyTask:
    size: int
    train_episodes: list
    train_latents: object
    eval_latents: object
    eval_images: list = field(default_factory=list)


def build_task(size: int = 32, num_train: int = 64, num_eval: int = 16, seed: int = 0) -> TinyTask:
    vae = PixelUnshuffleAutoencoder(spatial_compression_ratio=2)
    train = [TaskMixture(tasks=TASKS, num_pairs=(1, 2), size=size, seed=seed)[i] for i in range(num_train)]
    held = [TaskMixture(tasks=TASKS, num_pairs=(1, 2), size=size, seed=seed + 1)[i] for i in range(num_eval)]
    return TinyTask(size, train, encode_episodes(vae, train), encode_episodes(vae, held))


def build_model(seed: int = 0, preset: str = "tiny") -> LaVinDiTTransformer3DModel:
    torch.manual_seed(seed)
    return LaVinDiTTransformer3DModel.from_preset(preset, in_channels=12)


@torch.no_grad()
def held_out_loss(model, task: TinyTask, flow: RectifiedFlow) -> float:
    """Flow-matching loss on the held-out episodes, fixed times/noise (seeded per sample), no context dropout."""
    model.eval()
    lat = task.eval_latents
    ids = list(range(len(lat.targets)))
    result = flow.training_loss(model, lat.targets, lat.contexts, generator=sample_generators(12345, ids),
                                query_frames=lat.query_frames)  # fmt: skip
    model.train()
    return result.loss.item()


def train(
    model,
    task: TinyTask,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int = 8,
    eval_every: int = 25,
    repa=None,
    params: list | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Train ``steps`` steps; returns ``[(step, held-out loss), ...]`` every ``eval_every`` steps (and step 0)."""
    flow = RectifiedFlow(context_dropout=0.1)
    eval_flow = RectifiedFlow(context_dropout=0.0)
    lat = task.train_latents
    params = params or [p for p in model.parameters() if p.requires_grad]
    curve = [(0, held_out_loss(model, task, eval_flow))]
    model.train()
    for step in range(steps):
        ids = [(step * batch_size + i) % len(lat.targets) for i in range(batch_size)]
        targets = [lat.targets[i] for i in ids]
        with repa.capture() if repa is not None else nullcontext():
            result = flow.training_loss(model, targets, [lat.contexts[i] for i in ids],
                                        generator=sample_generators(0, [step * batch_size + i for i in range(batch_size)]),
                                        query_frames=[lat.query_frames[i] for i in ids])  # fmt: skip
            loss = result.loss
            if repa is not None:
                loss = loss + repa.loss([task.train_episodes[i].query_target for i in ids], targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % eval_every == 0:
            curve.append((step + 1, held_out_loss(model, task, eval_flow)))
            if on_eval is not None:
                on_eval(*curve[-1])
    return curve


def steps_to_reach(curve: list[tuple[int, float]], threshold: float) -> int | None:
    return next((step for step, loss in curve if loss <= threshold), None)
