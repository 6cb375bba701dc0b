"""Train a SINC meta-model on self-supervised prompts built from scikit-learn digits.

    accelerate launch train/sinc.py --config train/configs/sinc/tiny.yaml [--set prompts.bursty_ratio=0.5 ...]
    python train/sinc.py                      # same, tiny preset, single process

Data: scikit-learn's 8x8 handwritten digits (shipped in the wheel). Digits ``train_classes`` are the training pool,
the others are held out. Features (``model.features``) are the raw pixels (default) or a frozen tiny genvis ViT's
(CLS ; mean patch token) of the digits upsampled to ``image_size`` (``model.encoder``: a
``VisionTransformerModel.save_pretrained`` folder, else a seeded random ViT); both are standardised with training-pool
statistics. The training labels are **pseudo-labels** (k-means concepts of the training-pool features: no digit labels
are used); prompts are bursty / N-way / retrieval mixes with symbols re-drawn per prompt.

Evaluation: N-way K-shot episodes on the held-out digits with symbolic labels, the meta-model vs nearest-class-mean on
the same features, logged and written to ``<output_dir>/metrics.json``; the meta-model goes to ``<output_dir>/model``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler

from genvis.encoders import VisionTransformerModel
from genvis.models.sinc import SINC_PRESETS, SincMetaModel, SincPromptBuilder, nearest_class_mean, pseudo_labels
from genvis.training import (
    CheckpointConfig,
    CheckpointManager,
    NonFiniteGuard,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    progress_bar,
    setup_accelerator,
)

logger = get_logger(__name__)
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sinc" / "tiny.yaml"


@dataclass
class ModelConfig:
    preset: str = "tiny"  # SINC_PRESETS key (GPT-2 size)
    example_layout: str = "fused"  # "fused" (x_k + y_k tokens) or SINC's "interleaved" (see SincMetaModel)
    example_correlation: bool = True  # Linear(x_q * x_k) on each demonstration token
    features: str = "pixels"  # "pixels" (standardised 8x8 digits) or "encoder" (frozen genvis ViT, below)
    encoder: str | None = None  # a VisionTransformerModel folder; None = the seeded random tiny ViT below
    encoder_seed: int = 0


@dataclass
class DataConfig:
    image_size: int = 16
    train_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])  # the rest are held out
    num_pseudo_labels: int = 128  # k-means concepts on the training pool (the self-supervised labels)


@dataclass
class PromptConfig:
    num_ways: int = 2
    shots: int = 4
    bursty_ratio: float = 0.9  # SINC: bursty prompts make in-context learning emerge
    retrieval_fraction: float = 0.25  # share of prompts built from the query's nearest neighbours


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    grad_clip: float = 1.0
    warmup_steps: int = 20


@dataclass
class ScheduleConfig:
    max_steps: int = 600


@dataclass
class EvalConfig:
    episodes: int = 2000


@dataclass
class LoggingConfig:
    every: int = 25
    tracker: str | None = "tensorboard"


@dataclass
class TrainConfig:
    output_dir: str = "runs/sinc-tiny"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=200))
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def tiny_encoder(seed: int, image_size: int) -> VisionTransformerModel:
    """The default frozen encoder: a seeded tiny genvis ViT (4 px patches, CLS, RoPE)."""
    torch.manual_seed(seed)
    return VisionTransformerModel(
        patch_size=4 if image_size % 4 == 0 else 2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        mlp_hidden_dim=64,
        pooling_type="cls",
    ).eval()


@torch.no_grad()
def digit_features(encoder: VisionTransformerModel | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of scikit-learn's 1797 digits and their ``(1797,)`` labels.

    With ``encoder=None`` the features are the raw 8x8 pixels ``(1797, 64)``; otherwise the images are upsampled to
    ``image_size`` and encoded to ``(1797, 2D)`` (CLS ; mean patch token).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if encoder is None:
        return images.flatten(1), torch.tensor(digits.target)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.expand(-1, encoder.config.in_channels, -1, -1) - 0.5) / 0.5
    features = []
    for chunk in images.split(256):
        out = encoder(chunk)
        segments = out.segment_cu_seqlens.diff().tolist()
        mean = torch.stack([s.mean(0) for s in out.patch_tokens.split(segments)])
        features.append(torch.cat([out.pooler_output, mean], dim=-1))
    return torch.cat(features), torch.tensor(digits.target)


@torch.no_grad()
def few_shot_accuracy(
    model: SincMetaModel, builder: SincPromptBuilder, episodes: int, seed: int = 1234
) -> tuple[float, float]:
    """(meta-model, nearest-class-mean) accuracy on ``episodes`` N-way prompts from ``builder``."""
    model.eval()
    prompt = builder.sample(episodes, "nway", torch.Generator().manual_seed(seed))
    logits = model(
        prompt.example_features, prompt.example_labels, prompt.query_features, num_ways=builder.num_ways
    ).logits
    meta = (logits.argmax(-1) == prompt.query_labels).float().mean().item()
    ncm = nearest_class_mean(prompt.example_features, prompt.example_labels, prompt.query_features, builder.num_ways)
    model.train()
    return meta, (ncm == prompt.query_labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    config: TrainConfig = config_from_args(TrainConfig, args)
    if config.model.preset not in SINC_PRESETS:
        raise ValueError(f"model.preset must be one of {list(SINC_PRESETS)}, got {config.model.preset!r}")
    out = Path(config.output_dir)
    acc = setup_accelerator(out, seed=config.seed, log_with=config.logging.tracker, config=config_to_dict(config))

    # 1. frozen encoder features and self-supervised pseudo-labels on the training pool
    if config.model.features not in ("pixels", "encoder"):
        raise ValueError(f"model.features must be 'pixels' or 'encoder', got {config.model.features!r}")
    encoder = None
    if config.model.features == "encoder" and config.model.encoder:
        encoder = VisionTransformerModel.from_pretrained(config.model.encoder).eval()
    elif config.model.features == "encoder":
        encoder = tiny_encoder(config.model.encoder_seed, config.data.image_size)
    features, digits = digit_features(encoder, config.data.image_size)
    in_pool = torch.isin(digits, torch.tensor(config.data.train_classes))
    if in_pool.all() or not in_pool.any():
        raise ValueError(f"data.train_classes must leave some digits held out, got {config.data.train_classes}")
    # standardise with training-pool statistics: a random ViT's features share a large constant component that
    # would swamp cosine similarities (for the baseline and the k-means concepts alike)
    mean, std = features[in_pool].mean(0), features[in_pool].std(0).clamp_min(0.05)  # never-inked pixels stay ~0
    features = (features - mean) / std
    concepts = pseudo_labels(features[in_pool], config.data.num_pseudo_labels, seed=config.seed)
    p = config.prompts
    train_prompts = SincPromptBuilder(features[in_pool], concepts, p.num_ways, p.shots, p.bursty_ratio)
    heldout = SincPromptBuilder(features[~in_pool], digits[~in_pool], p.num_ways, p.shots)

    # 2. meta-model
    model = SincMetaModel(
        feature_dim=features.shape[-1],
        num_label_symbols=p.num_ways,
        max_examples=p.shots,
        example_layout=config.model.example_layout,
        example_correlation=config.model.example_correlation,
        **SINC_PRESETS[config.model.preset],
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=config.optim.warmup_steps, num_training_steps=config.schedule.max_steps
    )
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ckpt = CheckpointManager(acc, out / "checkpoints", total_limit=config.checkpoint.total_limit)
    guard = NonFiniteGuard(acc)

    def export(folder: Path) -> None:
        acc.unwrap_model(model).save_pretrained(folder / "model")

    if config.checkpoint.resume:
        ckpt.resume()
    bar = progress_bar(acc, config.schedule.max_steps, ckpt.state.step)
    per_rank = config.optim.batch_size // acc.num_processes
    while ckpt.state.step < config.schedule.max_steps:
        # 3. prompts of this step (a function of step and rank: exact resume)
        g = torch.Generator().manual_seed((config.seed * 1_000_003 + ckpt.state.step) * 64 + acc.process_index)
        mode = "retrieval" if torch.rand((), generator=g) < p.retrieval_fraction else "bursty"
        prompt = train_prompts.sample(per_rank, mode, g)
        loss = model(
            prompt.example_features.to(acc.device),
            prompt.example_labels.to(acc.device),
            prompt.query_features.to(acc.device),
            prompt.query_labels.to(acc.device),
            num_ways=p.num_ways,
        ).loss
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        if guard.check(loss, grad_norm, step=ckpt.state.step):
            optimizer.step()
            scheduler.step()
        else:
            ckpt.state.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        ckpt.state.step += 1
        bar.update(1)
        if ckpt.state.step % config.logging.every == 0:
            mean_loss = acc.reduce(loss.detach(), reduction="mean").item()
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            acc.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=ckpt.state.step)
        if ckpt.state.step % config.checkpoint.every_steps == 0:
            ckpt.save(extra_marker={"config": config_to_dict(config)}, export_fn=export)
    bar.close()

    # 4. few-shot evaluation on held-out digits, against nearest-class-mean on the same features
    metrics: dict = {}
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        meta, ncm = few_shot_accuracy(unwrapped, heldout, config.eval.episodes)
        metrics = {"heldout_meta_accuracy": meta, "heldout_ncm_accuracy": ncm, "steps": ckpt.state.step}
        logger.info(f"metrics: {metrics}", main_process_only=True)
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=ckpt.state.step)
        unwrapped.save_pretrained(out / "model")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main()
