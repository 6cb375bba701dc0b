"""Train LaVin-DiT's J-DiT on the built-in in-context tasks (``genvis.tasks``) with rectified flow.

    accelerate launch train/lavin_dit.py                       # = --config train/configs/lavin_dit/tiny.yaml
    accelerate launch train/lavin_dit.py --config train/configs/lavin_dit/tiny.yaml --set schedule.max_steps=50
    accelerate launch --multi_gpu --num_processes 2 train/lavin_dit.py     # 2-process DDP (gloo on CPU)

Every step draws ``schedule.batch_size`` (global) episodes: task mixture index ``step * batch + i`` (rank ``r`` takes its
contiguous slice), so the data order is a function of the step alone and a relaunched run continues exactly. Each
sample's time, noise and context dropout come from a generator seeded by its global index
(``genvis.diffusion.sample_generators``), so N processes reproduce 1 process with the same global batch. Episodes are
encoded clip by clip by the VAE (``vae.kind``: the exact pixel-unshuffle autoencoder, or a trained ST-VAE from
``train/st_vae.py``) and trained packed (episodes differ in pair count, frames and size). Every
``sampling.every_steps`` the pipeline answers held-out episodes: PSNR/IoU against copying the query are logged and a
grid ``<output_dir>/samples/in_context-<step>.png`` is written (rows: pairs, query, prediction, truth). Checkpoints are
atomic (``genvis.training.CheckpointManager``, each with a ``pipeline/`` export) and a run resumes from the latest
complete one; the end exports ``<output_dir>/pipeline`` (``LaVinDiTPipeline.save_pretrained``).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, Sampler

from genvis.diffusion import RectifiedFlow, encode_episodes, sample_generators, vae_compression
from genvis.layers.lora import LoRAOptions, add_lora, merge_lora, save_lora
from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
from genvis.models.lavin_dit import LAVIN_DIT_PRESETS
from genvis.pipelines import LaVinDiTPipeline, episode_grid_row, evaluate_in_context, evaluate_reliance
from genvis.tasks import TaskMixture, collate_episodes, get_task, list_tasks, sample_episode
from genvis.training import (
    CheckpointConfig,
    CheckpointManager,
    EMAConfig,
    NonFiniteGuard,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    create_ema,
    ema_weights,
    log_image_grid,
    progress_bar,
    setup_accelerator,
)
from genvis.training.optim import build_optimizer
from genvis.training.repa import REPAOptions, build_repa

logger = get_logger(__name__)
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "lavin_dit" / "tiny.yaml"


@dataclass
class ModelConfig:
    preset: str = "tiny"
    num_layers: int | None = None  # None keeps the preset's value
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    attention_head_dim: int | None = None
    rope_theta: float | None = None
    # genvis options for small budgets (README "Why the tiny model learns"); false / "velocity" = the official J-DiT
    query_skip: bool = True  # each target token also sees its query patch (zero-init linear)
    query_skip_kernel: int = 3  # target tokens see the k x k query patches around them (odd; 1 = their own)
    context_summary: bool = True  # task vector from the context pairs, added to the timestep vector
    prediction_type: str = "query_residual"  # "velocity" (official) | "sample" | "query_residual"
    gradient_checkpointing: bool = False


@dataclass
class VAEConfig:
    kind: str = "pixel"  # "pixel": exact space-to-depth (no training needed); "st_vae": a trained ST-VAE folder
    pretrained: str | None = None  # save_pretrained folder of the ST-VAE, e.g. runs/st_vae/vae
    pixel_factor: int = 2  # space-to-depth factor of the pixel autoencoder
    sample_posterior: bool = True  # official: encode with a posterior sample


@dataclass
class DataConfig:
    tasks: list[str] | None = None  # None: every task of `kinds`
    kinds: list[str] = field(default_factory=lambda: ["image"])
    num_pairs: list[int] = field(default_factory=lambda: [1, 2])  # inclusive range per episode
    size: int = 32
    video_frames: int | None = None  # None keeps the tasks' default (5 = 1 + 4k)
    num_workers: int = 1
    seed: int = 0


@dataclass
class FlowConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    l1_weight: float = 0.1
    context_dropout: float = 0.1  # unpublished; needed for the zero-frame CFG branch
    loss_weighting: str = "sample"  # the loss on the implied clean latents; "velocity": official
    loss_normalization: str = "copy"  # "copy": each sample's loss over its copy-the-query error (official: "none")


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" | "sgd_sai" (genvis.training.optim; SGD-SaI wants a far smaller lr)
    momentum: float = 0.9  # sgd_sai only
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 50


@dataclass
class ScheduleConfig:
    max_steps: int = 1500
    batch_size: int = 16  # global: split evenly over processes


@dataclass
class LoggingConfig:
    every_steps: int = 10
    log_with: str | None = "tensorboard"


@dataclass
class SamplingConfig:
    every_steps: int = 500  # also at the end; 0 = only at the end
    episodes_per_task: int = 3  # at the end; >= 2 for the query-reliance score
    progress_episodes_per_task: int = 1  # at the periodic steps (the first of each task's episodes)
    num_pairs: int = 2
    time_grid: str | None = "lavin-20"  # official grids: lavin-20 | lavin-30 | lavin-40; null: uniform steps
    num_inference_steps: int | None = None  # uniform grid (only with time_grid: null)
    guidance_scale: float = 1.5
    split: str = "test"  # held-out sources
    reliance: bool = True  # at the end: context / query reliance (one more answer per episode)


@dataclass
class TrainConfig:
    output_dir: str = "runs/lavin_dit"
    seed: int = 0
    mixed_precision: str = "no"
    # torch intra-op threads per process (None: torch's default). Tiny models: 1, since on a shared 2-core box
    # thread synchronisation on small tensors costs more than it saves.
    num_threads: int | None = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=True, decay=0.995))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=500, total_limit=2))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    repa: REPAOptions = field(default_factory=REPAOptions)  # README "Efficiency: REPA alignment, SGD-SaI, LoRA"
    lora: LoRAOptions = field(default_factory=LoRAOptions)


class StepSliceSampler(Sampler[int]):
    """Indices ``step * global_batch + rank * local_batch + i`` for steps ``start_step .. max_steps - 1``."""

    def __init__(self, start_step: int, max_steps: int, global_batch: int, rank: int, world: int) -> None:
        self.start_step, self.max_steps, self.global_batch = start_step, max_steps, global_batch
        self.local = global_batch // world
        self.offset = rank * self.local

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            base = step * self.global_batch + self.offset
            yield from range(base, base + self.local)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.local


def build_vae(cfg: VAEConfig):
    if cfg.kind == "pixel":
        return PixelUnshuffleAutoencoder(spatial_compression_ratio=cfg.pixel_factor)
    if cfg.kind == "st_vae":
        if not cfg.pretrained:
            raise ValueError(
                "vae.pretrained: kind 'st_vae' needs a trained ST-VAE folder (train/st_vae.py writes one)"
            )
        from genvis.vae import AutoencoderKLSTVAE

        return AutoencoderKLSTVAE.from_pretrained(cfg.pretrained)
    raise ValueError(f"vae.kind: expected 'pixel' or 'st_vae', got {cfg.kind!r}")


def evaluation_episodes(cfg: TrainConfig, tasks: list[str]) -> list:
    s = cfg.sampling
    return [
        sample_episode(task, s.num_pairs, seed=10_000 + i, size=cfg.data.size, split=s.split,
                       num_frames=cfg.data.video_frames if get_task(task).kind == "video" else None)
        for task in tasks
        for i in range(s.episodes_per_task)
    ]  # fmt: skip


def check_config(cfg: TrainConfig, vae) -> list[str]:
    """Fail at start-up, naming the field, on a config that cannot train or be scored; returns the task list."""
    tasks = cfg.data.tasks or [name for kind in cfg.data.kinds for name in list_tasks(kind)]
    if not tasks:
        raise ValueError(f"data.tasks / data.kinds: no task left (tasks={cfg.data.tasks}, kinds={cfg.data.kinds}); "
                         f"expected names from {list_tasks()}")  # fmt: skip
    for name in tasks:
        get_task(name)  # unknown names raise, listing the registered ones
    _, spatial = vae_compression(vae)
    patch = LAVIN_DIT_PRESETS.get(cfg.model.preset, {}).get("patch_size", 2)
    multiple = spatial * patch
    if cfg.data.size % multiple:
        raise ValueError(f"data.size: {cfg.data.size} px is not divisible by the VAE x patch grid ({spatial} x {patch} "
                         f"= {multiple}); use a multiple of {multiple}")  # fmt: skip
    low, high = cfg.data.num_pairs
    if not 1 <= low <= high:
        raise ValueError(f"data.num_pairs: expected [low, high] with 1 <= low <= high, got {cfg.data.num_pairs}")
    if cfg.sampling.reliance and cfg.sampling.episodes_per_task == 1:
        raise ValueError("sampling.episodes_per_task: the reliance scores need >= 2 (0 = no evaluation), got 1 "
                         "(or set sampling.reliance: false)")  # fmt: skip
    if cfg.sampling.time_grid is not None and cfg.sampling.num_inference_steps is not None:
        raise ValueError("sampling.time_grid and sampling.num_inference_steps: set one (the other to null)")
    return tasks


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, DEFAULT_CONFIG)
    cfg = config_from_args(TrainConfig, parser.parse_args())
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    accelerator = setup_accelerator(
        out, seed=cfg.seed, mixed_precision=cfg.mixed_precision, log_with=cfg.logging.log_with,
        project_name="lavin_dit", config=config_to_dict(cfg),
    )  # fmt: skip
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.schedule.batch_size % world:
        raise ValueError(f"schedule.batch_size ({cfg.schedule.batch_size}) must be divisible by {world} processes")

    # 1. VAE (frozen), J-DiT, optimiser, LR schedule
    vae = build_vae(cfg.vae).to(accelerator.device).requires_grad_(False).eval()
    tasks = check_config(cfg, vae)
    overrides = {
        k: v
        for k, v in config_to_dict(cfg.model).items()
        if v is not None and k not in ("preset", "gradient_checkpointing")
    }
    if cfg.lora.enabled and cfg.lora.base_model:
        model = LaVinDiTTransformer3DModel.from_pretrained(cfg.lora.base_model)
    else:
        model = LaVinDiTTransformer3DModel.from_preset(
            cfg.model.preset, in_channels=int(vae.config.latent_channels), **overrides
        )
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    lora_config = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) if cfg.lora.enabled else None
    repa = build_repa(cfg.repa, model, seed=cfg.seed) if cfg.repa.enabled else None
    if repa is not None:
        repa.encoder.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = create_ema(model, accelerator, decay=cfg.ema.decay) if cfg.ema.enabled else None
    trainable += list(repa.projector.parameters()) if repa is not None else []
    optimizer = build_optimizer(cfg.optim.name, trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                betas=cfg.optim.betas, momentum=cfg.optim.momentum)  # fmt: skip
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=cfg.schedule.max_steps)  # fmt: skip
    if repa is not None:
        model, repa.projector, optimizer = accelerator.prepare(model, repa.projector, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    # stepped once per optimizer step on every rank (a prepared scheduler steps num_processes times)
    accelerator.register_for_checkpointing(lr_scheduler)
    flow = RectifiedFlow(cfg.flow.logit_mean, cfg.flow.logit_std, cfg.flow.shift, cfg.flow.l1_weight,
                         cfg.flow.context_dropout, cfg.flow.loss_weighting, cfg.flow.loss_normalization)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)

    def make_pipeline() -> LaVinDiTPipeline:
        transformer = accelerator.unwrap_model(model)
        pipe = LaVinDiTPipeline(merge_lora(transformer) if cfg.lora.enabled else transformer, vae, scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    ckpt = CheckpointManager(accelerator, out / "checkpoints", total_limit=cfg.checkpoint.total_limit)
    guard = NonFiniteGuard(accelerator)
    if cfg.checkpoint.resume and (resumed := ckpt.resume()) is not None and accelerator.is_main_process:
        with open(out / "train_log.jsonl", "a") as handle:
            handle.write(json.dumps({"resumed_from": str(resumed), "step": ckpt.state.step}) + "\n")

    # 2. data: the step fixes the indices, so a resumed run replays the same order
    mixture = TaskMixture(tasks=tasks, num_pairs=tuple(cfg.data.num_pairs), size=cfg.data.size,
                          length=max(1, cfg.schedule.max_steps * cfg.schedule.batch_size), seed=cfg.data.seed,
                          num_frames=cfg.data.video_frames)  # fmt: skip
    local_batch = cfg.schedule.batch_size // world
    sampler = StepSliceSampler(ckpt.state.step, cfg.schedule.max_steps, cfg.schedule.batch_size, rank, world)
    loader = DataLoader(mixture, batch_size=local_batch, sampler=sampler, collate_fn=collate_episodes,
                        num_workers=cfg.data.num_workers, persistent_workers=False)  # fmt: skip
    eval_episodes = evaluation_episodes(cfg, tasks)

    sampling = {"num_inference_steps": cfg.sampling.num_inference_steps, "time_grid": cfg.sampling.time_grid,
                "guidance_scale": cfg.sampling.guidance_scale, "seed": cfg.seed}  # fmt: skip

    def sample_and_log(step: int, final: bool = False) -> None:
        per_task = cfg.sampling.episodes_per_task
        keep = per_task if final else min(per_task, cfg.sampling.progress_episodes_per_task)
        episodes = [ep for index, ep in enumerate(eval_episodes) if index % max(per_task, 1) < keep]
        if accelerator.is_main_process and episodes:
            model.eval()
            with ema_weights(ema, accelerator.unwrap_model(model)):
                pipe = make_pipeline()
                scores, predictions = evaluate_in_context(pipe, episodes, return_predictions=True, **sampling)
                reliance = None
                if final and cfg.sampling.reliance and len(tasks) >= 2:  # context needs 2 tasks
                    reliance = evaluate_reliance(pipe, episodes, predictions, **sampling)
            model.train()
            rows = [episode_grid_row(ep, pred) for ep, pred in zip(episodes, predictions)]
            pairs = max(ep.num_pairs for ep in episodes)
            columns = [f"{kind} {i}" for i in range(1, pairs + 1) for kind in ("input", "target")]
            log_image_grid(accelerator, "in_context", rows, step, out, scale=max(1, 96 // cfg.data.size),
                           column_labels=[*columns, "query", "prediction", "truth"],
                           row_labels=[ep.task for ep in episodes])  # fmt: skip
            metrics = {}
            for task, s in scores.items():
                metrics.update({f"eval/{task}/psnr": s.psnr, f"eval/{task}/psnr_copy": s.psnr_copy})
                if s.iou is not None:
                    metrics.update({f"eval/{task}/iou": s.iou, f"eval/{task}/iou_copy": s.iou_copy})
            metrics["eval/tasks_beating_copy"] = sum(s.beats_copy for s in scores.values())
            summary = {"step": step, "episodes": len(episodes)}
            if reliance is not None:
                metrics.update(
                    {"eval/context_reliance": reliance.context_rate, "eval/query_reliance": reliance.query_rate}
                )
                summary.update(context_reliance=reliance.context_rate, query_reliance=reliance.query_rate,
                               reliance_per_task=reliance.per_task)  # fmt: skip
            accelerator.log(metrics, step=step)
            report = {task: vars(s) | {"beats_copy": s.beats_copy} for task, s in scores.items()}
            (out / "eval.json").write_text(json.dumps(summary | {"tasks": report}, indent=1))
            logger.info(f"step {step}: {metrics['eval/tasks_beating_copy']}/{len(scores)} tasks beat copy-the-input",
                        main_process_only=True)  # fmt: skip
        accelerator.wait_for_everyone()

    def model_card() -> dict:
        """The export's README.md: the command that trained it and the latest held-out scores (with their step)."""
        card = {"command": shlex.join(["accelerate", "launch", "train/lavin_dit.py", *sys.argv[1:]])}
        if (out / "eval.json").is_file():
            summary = json.loads((out / "eval.json").read_text())
            card["metrics"] = {
                key: summary[key] for key in ("step", "context_reliance", "query_reliance") if key in summary
            }
            card["metrics"]["tasks_beating_copy"] = sum(task["beats_copy"] for task in summary["tasks"].values())
        return card

    def export(folder: Path) -> None:
        with ema_weights(ema, accelerator.unwrap_model(model)):
            make_pipeline().save_pretrained(folder / "pipeline", model_card=model_card())
        if lora_config is not None:
            save_lora(accelerator.unwrap_model(model), folder / "lora", lora_config)

    # 3. the loop
    model.train()
    patch_area = accelerator.unwrap_model(model).config.patch_size ** 2
    bar = progress_bar(accelerator, cfg.schedule.max_steps, ckpt.state.step)
    timer, tokens = time.perf_counter(), 0
    for episodes in loader:
        step = ckpt.state.step
        ids = sampler.offset + step * cfg.schedule.batch_size + torch.arange(local_batch)
        latents = encode_episodes(vae, episodes, sample_posterior=cfg.vae.sample_posterior)
        targets = [z.to(accelerator.device) for z in latents.targets]
        contexts = [z.to(accelerator.device) for z in latents.contexts]
        with accelerator.autocast(), repa.capture() if repa is not None else nullcontext():
            result = flow.training_loss(model, targets, contexts, generator=sample_generators(cfg.seed, ids),
                                        query_frames=latents.query_frames)  # fmt: skip
            loss = result.loss
            if repa is not None:  # align the hooked block with the encoder features of the clean query targets
                alignment = repa.loss([ep.query_target for ep in episodes], targets)
                loss = loss + alignment.loss
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        if guard.check(loss, grad_norm, step=step):
            optimizer.step()
            if ema is not None:
                ema.step(accelerator.unwrap_model(model).parameters())
        else:
            ckpt.state.skipped_steps += 1
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ckpt.state.step += 1
        ckpt.state.samples_seen += cfg.schedule.batch_size
        tokens += sum(z[0].numel() for z in targets + contexts) // patch_area  # (t*h*w) / p^2 per clip
        bar.update(1)

        step = ckpt.state.step
        if step % cfg.logging.every_steps == 0 or step == cfg.schedule.max_steps:
            loss = accelerator.gather(result.per_sample.detach()).mean().item()
            elapsed = time.perf_counter() - timer
            logs = {"train/loss": loss, "train/processes": world, "train/lr": lr_scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                    "train/tokens_per_s": tokens * world / max(elapsed, 1e-9)}  # fmt: skip
            if repa is not None:
                logs["train/repa_similarity"] = accelerator.gather(alignment.similarity[None]).mean().item()
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{loss:.4f}")
            if accelerator.is_main_process:
                with open(out / "train_log.jsonl", "a") as handle:
                    handle.write(json.dumps({"step": step, **logs}) + "\n")
            timer, tokens = time.perf_counter(), 0
        if cfg.sampling.every_steps and step % cfg.sampling.every_steps == 0 and step < cfg.schedule.max_steps:
            sample_and_log(step)
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.schedule.max_steps:
            ckpt.save(extra_marker={"config": config_to_dict(cfg)}, export_fn=export)
    bar.close()

    # 4. final samples (+ reliance scores) and the exported pipeline
    sample_and_log(ckpt.state.step, final=True)
    if accelerator.is_main_process:
        export(out)
        logger.info(f"exported {out / 'pipeline'}", main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
