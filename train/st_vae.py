"""Train LaVin-DiT's ST-VAE (``genvis.vae.AutoencoderKLSTVAE``) from scratch on the built-in images and videos.

    accelerate launch train/st_vae.py --config train/configs/st_vae/tiny.yaml [--set optim.lr=1e-3 ...]

Data: real-image crops + procedural scenes, and real/procedural video clips of ``1 + 4k`` frames
(``genvis.tasks.SourceDataset``); images first, then alternating image and video batches. Loss: L1 + MSE + KL, and
after ``loss.gan_start_step`` a PatchGAN hinge loss with taming's adaptive weight. Every ``eval_every_steps`` the
reconstruction PSNR (posterior mode) of held-out images and clips is logged and a grid written under ``samples/``.
Checkpoints are atomic (``genvis.training.CheckpointManager``) and a run resumes from the latest complete one; each
checkpoint and the end of training export ``save_pretrained`` folders (``<output_dir>/vae``) with the latent shift
and scale estimated on training data.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler

from genvis.tasks import SourceDataset
from genvis.tasks.ops import down_up
from genvis.training import (
    CheckpointConfig,
    CheckpointManager,
    NonFiniteGuard,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    log_image_grid,
    progress_bar,
    setup_accelerator,
)
from genvis.vae import build_st_vae, decode_latents, estimate_latent_normalization, posterior, set_latent_normalization
from genvis.vae.losses import (
    PatchDiscriminator,
    adaptive_gan_weight,
    frames_as_images,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    kl_loss,
    psnr,
    reconstruction_loss,
)

logger = get_logger(__name__)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    # ``AutoencoderKLCogVideoX`` config fields over the preset's, e.g. {block_out_channels: [64, 64, 128, 128]}.
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    size: int = 32
    image_batch_size: int = 8
    video_batch_size: int = 2
    video_frames: int = 5  # 1 + 4k: 2 latent frames
    video_start_step: int = 0  # images only before this step (LaVin trains images first, then joint)
    video_every: int = 2  # every n-th step after video_start_step is a video batch; 0 = never
    eval_images: int = 16
    eval_videos: int = 4
    normalization_batches: int = 4  # training batches used to estimate the latent shift / scale on export
    seed: int = 0


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    # On per-element means; LDM's 1e-6 on sums is ~1e-7 here. 1e-4 keeps tiny latents near unit scale.
    kl_weight: float = 1e-4
    gan_weight: float = 0.1
    gan_start_step: int = -1  # < 0 disables the discriminator
    disc_lr: float = 2e-4
    disc_base_channels: int = 32
    disc_num_layers: int = 3  # 70 px receptive field; needs frames >= 3 * 2**layers px (2 layers for 16 px)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 20


@dataclass
class ScheduleConfig:
    max_steps: int = 300
    # Stop (with a checkpoint) at this step without changing the LR schedule, e.g. a time-boxed job that a later run
    # resumes; 0 = run to max_steps. Changing max_steps instead would change the cosine schedule.
    stop_at_step: int = 0


@dataclass
class LoggingConfig:
    every_steps: int = 10
    eval_every_steps: int = 100
    log_with: str | None = "tensorboard"


@dataclass
class TrainConfig:
    output_dir: str = "runs/st_vae"
    seed: int = 0
    mixed_precision: str = "no"
    # CPU intra-op threads (0 = torch's default). The tiny VAE's small 3-D convs cost ~5x less CPU on 1 thread than
    # on 2 when the machine is shared (measured: 0.24 vs 1.3 CPU-s per 4x32x32 step).
    num_threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class EncodeDecode(torch.nn.Module):
    """``pixels -> (reconstruction, posterior)`` in one ``forward``, so DDP sees (and syncs) the whole VAE pass."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None):
        distribution = posterior(self.vae, pixels)
        return decode_latents(self.vae, distribution.sample(generator=generator), denormalize=False), distribution


def is_video_step(step: int, data: DataConfig) -> bool:
    return data.video_every > 0 and step >= data.video_start_step and step % data.video_every == data.video_every - 1


def batch_at(dataset: SourceDataset, step: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The ``(B, 3, T, H, W)`` batch of ``rank`` at ``step``: indices depend only on (step, rank), so resume is exact."""
    start = (step * world + rank) * batch_size
    return torch.stack([dataset[index] for index in range(start, start + batch_size)])


def reference_psnr(clips: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR of trivial codecs on the held-out sets, to judge the VAE's: per-clip mean colour, bicubic x8 down-up."""
    metrics = {}
    for name, batch in clips.items():
        mean_colour = batch.mean(dim=(2, 3, 4), keepdim=True).expand_as(batch)
        metrics[f"reference/psnr_{name}_mean_colour"] = float(psnr(mean_colour, batch).mean())
        bicubic = torch.stack([down_up(clip, 8) for clip in batch])
        metrics[f"reference/psnr_{name}_bicubic_x8"] = float(psnr(bicubic, batch).mean())
    return metrics


@torch.no_grad()
def evaluate(
    vae: torch.nn.Module, clips: dict[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, float], dict]:
    """Reconstruction PSNR (posterior mode) of the held-out image and video sets, plus reconstructions for grids."""
    metrics, reconstructions = {}, {}
    for name, batch in clips.items():
        batch = batch.to(device)
        recon = decode_latents(vae, posterior(vae, batch).mode(), denormalize=False)
        metrics[f"eval/psnr_{name}"] = float(psnr(recon, batch).mean())
        reconstructions[name] = recon.clamp(-1, 1).cpu()
    return metrics, reconstructions


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, default_config=Path(__file__).parent / "configs" / "st_vae" / "tiny.yaml")
    config = config_from_args(TrainConfig, parser.parse_args(argv))
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    accelerator = setup_accelerator(
        output_dir,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        log_with=config.logging.log_with,
        project_name="st_vae",
        config=config_to_dict(config),
    )
    data, loss_cfg = config.data, config.loss
    rank, world = accelerator.process_index, accelerator.num_processes

    # 1. Model, discriminator, optimizers.
    unwrapped = build_st_vae(
        config.model.preset, **{"sample_height": data.size, "sample_width": data.size, **config.model.overrides}
    )
    if config.model.gradient_checkpointing:
        unwrapped.enable_gradient_checkpointing()
    model = EncodeDecode(unwrapped)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay
    )
    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer,
        num_warmup_steps=config.optim.warmup_steps * world,
        num_training_steps=config.schedule.max_steps * world,
    )
    use_gan = loss_cfg.gan_start_step >= 0
    discriminator = (
        PatchDiscriminator(base_channels=loss_cfg.disc_base_channels, num_layers=loss_cfg.disc_num_layers)
        if use_gan
        else None
    )
    if use_gan:
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=loss_cfg.disc_lr, betas=(0.5, 0.9))
        model, optimizer, lr_scheduler, discriminator, disc_optimizer = accelerator.prepare(
            model, optimizer, lr_scheduler, discriminator, disc_optimizer
        )
        disc_module = accelerator.unwrap_model(discriminator)
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    # 2. Data: map-style, index -> clip, so a resumed run replays the same batches.
    images = SourceDataset("image", 1, data.size, "train", length=10**9, seed=data.seed)
    videos = SourceDataset("video", data.video_frames, data.size, "train", length=10**9, seed=data.seed)
    held_out = {
        "images": torch.stack([SourceDataset("image", 1, data.size, "test", seed=data.seed)[i] for i in range(data.eval_images)]),
        "videos": torch.stack(
            [SourceDataset("video", data.video_frames, data.size, "test", seed=data.seed)[i] for i in range(data.eval_videos)]
        ),
    }  # fmt: skip

    references = reference_psnr(held_out)
    logger.info("held-out references: " + ", ".join(f"{k} {v:.2f} dB" for k, v in references.items()))

    def export(folder: Path) -> None:
        """``save_pretrained`` the VAE with its latent shift / scale measured on training batches."""
        norm_batches = [
            batch_at(images, 10**6 + i, data.image_batch_size, 0, 1) for i in range(data.normalization_batches)
        ]
        norm_batches += [
            batch_at(videos, 10**6 + i, data.video_batch_size, 0, 1) for i in range(data.normalization_batches)
        ]
        generator = torch.Generator(accelerator.device).manual_seed(config.seed)  # leaves the global RNG alone
        batches = [batch.to(accelerator.device) for batch in norm_batches]
        shift, scale = estimate_latent_normalization(unwrapped, batches, generator=generator)
        set_latent_normalization(unwrapped, shift, scale)
        unwrapped.save_pretrained(folder / "vae")
        if discriminator is not None:
            disc_module.save_pretrained(folder / "discriminator")

    checkpoints = CheckpointManager(accelerator, output_dir / "checkpoints", total_limit=config.checkpoint.total_limit)
    if config.checkpoint.resume:
        checkpoints.resume()
    state = checkpoints.state
    guard = NonFiniteGuard(accelerator)
    last_layer = unwrapped.decoder.conv_out.conv.weight  # taming's adaptive GAN weight is measured here
    bar = progress_bar(accelerator, config.schedule.max_steps, initial=state.step, desc="st_vae")
    metrics: dict[str, float] = {}
    tic, samples_since = time.perf_counter(), 0

    # 3. The loop.
    last_step = config.schedule.max_steps
    if config.schedule.stop_at_step > 0:
        last_step = min(last_step, config.schedule.stop_at_step)
    while state.step < last_step:
        step = state.step
        video = is_video_step(step, data)
        dataset, batch_size = (videos, data.video_batch_size) if video else (images, data.image_batch_size)
        pixels = batch_at(dataset, step, batch_size, rank, world).to(accelerator.device)  # (B, 3, T, H, W)
        gan_active = use_gan and step >= loss_cfg.gan_start_step

        with accelerator.autocast():
            # Posterior noise from a (seed, step, rank) generator: a resumed run draws exactly what it would have.
            noise = torch.Generator(accelerator.device).manual_seed(config.seed * 1_000_003 + step * world + rank)
            recon, distribution = model(pixels, generator=noise)
            rec = reconstruction_loss(recon, pixels, loss_cfg.l1_weight, loss_cfg.mse_weight)
            kl = kl_loss(distribution)
            loss = rec + loss_cfg.kl_weight * kl
            if gan_active:
                # The unwrapped, frozen discriminator: its weights get no gradient (and no DDP sync) from this term.
                disc_module.requires_grad_(False)
                adversarial = generator_adversarial_loss(disc_module(frames_as_images(recon)))
                disc_module.requires_grad_(True)
                weight = adaptive_gan_weight(rec, adversarial, last_layer) * loss_cfg.gan_weight
                loss = loss + weight * adversarial
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        if guard.check(loss, grad_norm, step=step):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()

        if gan_active:
            # Discriminator step on detached reconstructions; real and fake in one forward (one DDP pass per backward).
            frames = torch.cat([frames_as_images(pixels), frames_as_images(recon.detach())])
            logits_real, logits_fake = discriminator(frames).chunk(2)
            disc_loss = hinge_discriminator_loss(logits_real, logits_fake)
            accelerator.backward(disc_loss)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.samples_seen += batch_size * world
        state.skipped_steps = guard.total_skipped
        samples_since += batch_size * world
        bar.update(1)

        # 4. Logging, evaluation, checkpoints.
        if state.step % config.logging.every_steps == 0 or state.step == last_step:
            elapsed = time.perf_counter() - tic
            logs = {
                "train/loss": float(accelerator.reduce(loss.detach(), reduction="mean")),
                "train/rec": float(rec.detach()),
                "train/kl": float(kl.detach()),
                "train/grad_norm": float(grad_norm),
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/samples_per_s": samples_since / max(elapsed, 1e-9),
            }
            if gan_active:
                logs["train/disc_loss"] = float(disc_loss.detach())
            accelerator.log(logs, step=state.step)
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", kl=f"{logs['train/kl']:.2f}")
            tic, samples_since = time.perf_counter(), 0
        if state.step % config.logging.eval_every_steps == 0 or state.step == last_step:
            if accelerator.is_main_process:
                unwrapped.eval()
                metrics, recons = evaluate(unwrapped, held_out, accelerator.device)
                unwrapped.train()
                accelerator.log(metrics, step=state.step)
                logger.info(f"step {state.step}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in metrics.items()))
                rows = [list(held_out["images"][:8, :, 0]), list(recons["images"][:8, :, 0])]
                for index in range(min(2, data.eval_videos)):
                    rows += [list(held_out["videos"][index].unbind(1)), list(recons["videos"][index].unbind(1))]
                log_image_grid(accelerator, "reconstructions", rows, state.step, output_dir)
            accelerator.wait_for_everyone()
        if state.step % config.checkpoint.every_steps == 0 or state.step == last_step:
            checkpoints.save(extra_marker={"config": config_to_dict(config)}, export_fn=export)

    bar.close()
    # 5. Final export: the latest checkpoint's folder holds the same weights; <output_dir>/vae is the stable path.
    if accelerator.is_main_process:
        export(output_dir)
        if not metrics:
            metrics, _ = evaluate(unwrapped, held_out, accelerator.device)
        summary = {**metrics, **references, "step": state.step}
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        logger.info(f"exported {output_dir / 'vae'}; final " + json.dumps(summary))
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
