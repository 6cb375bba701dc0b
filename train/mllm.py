"""Train an MLLM vision tower (genvis ViT + 2x2 merger + chunk-time aggregator) with a ``transformers`` causal LM.

    accelerate launch train/mllm.py --config train/configs/mllm/tiny.yaml [--set model.lora=true ...]
    python train/mllm.py                      # same, tiny preset, single process

Data (built in, exact labels): procedural scenes and clips from ``genvis.data`` turned into visual questions whose
answer is only in the pixels: "what colour is the shape?" (one-shape images), "how many shapes?" (1-3 shapes) and,
for clips, "which way does the shape move?" (needs the chunk order). Loss: next-token CE on the answer (+ EOS) only.

Every ``checkpoint.every_steps`` steps an atomic checkpoint is written (``genvis.training.CheckpointManager``) with a
``save_pretrained`` export; a run resumes from the latest complete one. At the end the answer accuracy (greedy
decoding, exact match) is measured with the real images and with blank images, on the training questions and on
held-out ones, logged and written to ``<output_dir>/metrics.json``; the model goes to ``<output_dir>/model``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler

from genvis.data import procedural_scene, procedural_video
from genvis.layers.lora import save_vision_language_lora
from genvis.models.vision_tower import VisionLanguageModel, VisionLanguageProcessor, tiny_text_config
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
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mllm" / "tiny.yaml"


@dataclass
class ModelConfig:
    text_model_type: str = "qwen2"  # any transformers causal LM type with a tiny config: "qwen2" or "llama"
    hidden_size: int = 64
    pretrained: str | None = None  # a VisionLanguageModel.save_pretrained folder to start from
    lora: bool = False  # LoRA on the LM (+ the projector); the ViT and LM base weights stay frozen
    lora_r: int = 8
    lora_alpha: int = 16


@dataclass
class DataConfig:
    image_size: int = 32
    num_train: int = 48  # distinct training questions (map-style: sample i is seed i, so resume is exact)
    num_eval: int = 48  # held-out questions (seeds after the training ones)
    questions: list[str] = field(default_factory=lambda: ["background"])  # "background", "colour", "count", "motion"
    video_frames: int = 6  # frames per clip for "motion" questions


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_clip: float = 1.0
    warmup_steps: int = 10


@dataclass
class ScheduleConfig:
    max_steps: int = 150


@dataclass
class LoggingConfig:
    every: int = 10
    tracker: str | None = "tensorboard"


@dataclass
class TrainConfig:
    output_dir: str = "runs/mllm-tiny"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=50))
    logging: LoggingConfig = field(default_factory=LoggingConfig)


QUESTIONS = {
    "background": "<image>What colour is the background? ",
    "colour": "<image>What colour is the shape? ",
    "count": "<image>How many shapes? ",
    "motion": "<video>Which way does the shape move? ",
}


def make_sample(seed: int, kind: str, size: int, video_frames: int) -> dict:
    """One visual question: ``{"prompt", "answer", "image"|"video"}`` with ``(C, H, W)`` / ``(T, C, H, W)`` uint8."""
    if kind == "background":
        scene = procedural_scene(seed, size=size, num_shapes=(1, 2))
        return {"prompt": QUESTIONS[kind], "answer": scene.background, "image": _chw(scene.image)}
    if kind == "colour":
        scene = procedural_scene(seed, size=size, num_shapes=(1, 1))
        return {"prompt": QUESTIONS[kind], "answer": scene.shapes[0].color, "image": _chw(scene.image)}
    if kind == "count":
        scene = procedural_scene(seed, size=size, num_shapes=(1, 3))
        return {"prompt": QUESTIONS[kind], "answer": str(len(scene.shapes)), "image": _chw(scene.image)}
    if kind == "motion":
        clip = procedural_video(seed, num_frames=video_frames, size=size, num_shapes=(1, 1), camera_pan_probability=0)
        return {"prompt": QUESTIONS[kind], "answer": clip.motions[0], "video": _chw(clip.frames)}
    raise ValueError(f"data.questions entries must be one of {list(QUESTIONS)}, got {kind!r}")


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, -3)))


def make_samples(first_seed: int, count: int, data: DataConfig) -> list[dict]:
    kinds = data.questions
    return [
        make_sample(first_seed + i, kinds[i % len(kinds)], data.image_size, data.video_frames) for i in range(count)
    ]


def collate(processor: VisionLanguageProcessor, samples: list[dict], with_answers: bool, blank: bool = False) -> dict:
    """Batch samples; ``blank`` replaces every image/clip by a constant grey one (the text-only control)."""

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 128) if blank else x

    return processor(
        [s["prompt"] for s in samples],
        images=[pixels(s["image"]) for s in samples if "image" in s],
        videos=[pixels(s["video"]) for s in samples if "video" in s],
        answers=[s["answer"] for s in samples] if with_answers else None,
    )


@torch.no_grad()
def answer_accuracy(
    model: VisionLanguageModel, processor: VisionLanguageProcessor, samples: list[dict], blank: bool = False
) -> float:
    """Exact-match accuracy of greedy answers (decoded up to EOS)."""
    model.eval()
    correct = 0
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        batch = collate(processor, chunk, with_answers=False, blank=blank)
        batch = {k: v.to(model.language_model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        new = model.generate(**batch, max_new_tokens=16, do_sample=False)
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        correct += sum(text.strip() == s["answer"] for text, s in zip(texts, chunk))
    model.train()
    return correct / len(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    config: TrainConfig = config_from_args(TrainConfig, args)
    out = Path(config.output_dir)
    acc = setup_accelerator(out, seed=config.seed, log_with=config.logging.tracker, config=config_to_dict(config))

    # 1. model + processor
    if config.model.pretrained:
        model = VisionLanguageModel.from_pretrained(config.model.pretrained)
    else:
        text_config = tiny_text_config(config.model.text_model_type, hidden_size=config.model.hidden_size)
        model = VisionLanguageModel.from_configs(text_config)
    if config.model.lora and model.config.lora is None:
        model.enable_lora(r=config.model.lora_r, lora_alpha=config.model.lora_alpha, train_projector=True)
    processor = VisionLanguageProcessor.from_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info(f"trainable parameters: {sum(p.numel() for p in params):,}", main_process_only=True)

    # 2. data: fixed training questions; the batch of a step is a function of the step (exact resume)
    train_samples = make_samples(0, config.data.num_train, config.data)
    eval_samples = make_samples(10_000, config.data.num_eval, config.data)

    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=config.optim.warmup_steps, num_training_steps=config.schedule.max_steps
    )
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ckpt = CheckpointManager(acc, out / "checkpoints", total_limit=config.checkpoint.total_limit)
    guard = NonFiniteGuard(acc)

    def export(folder: Path) -> None:
        acc.unwrap_model(model).save_pretrained(folder / "model")
        save_vision_language_lora(acc.unwrap_model(model), folder / "model")  # + peft's layout in model/lora

    if config.checkpoint.resume:
        ckpt.resume()
    bar = progress_bar(acc, config.schedule.max_steps, ckpt.state.step)
    rank, world = acc.process_index, acc.num_processes
    started = time.perf_counter()
    loss = None
    while ckpt.state.step < config.schedule.max_steps:
        # 3. one step: this rank's share of the step's batch
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + ckpt.state.step)
        order = torch.randint(len(train_samples), (config.optim.batch_size,), generator=g).tolist()
        batch = collate(processor, [train_samples[i] for i in order[rank::world]], with_answers=True)
        batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = model(**batch).loss
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(params, config.optim.grad_clip)
        if guard.check(loss, grad_norm, step=ckpt.state.step):
            optimizer.step()
            scheduler.step()
        else:
            ckpt.state.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        ckpt.state.step += 1
        ckpt.state.samples_seen += config.optim.batch_size
        bar.update(1)
        if ckpt.state.step % config.logging.every == 0:
            mean_loss = acc.reduce(loss.detach(), reduction="mean").item()
            rate = ckpt.state.samples_seen / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            acc.log(
                {"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0], "train/samples_per_s": rate},
                step=ckpt.state.step,
            )
        if ckpt.state.step % config.checkpoint.every_steps == 0:
            ckpt.save(extra_marker={"config": config_to_dict(config)}, export_fn=export)
    bar.close()

    # 4. evaluation: answers with the image vs with a blank image (the LM alone cannot know the colour)
    metrics = {}
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        metrics = {
            "train_accuracy": answer_accuracy(unwrapped, processor, train_samples),
            "train_accuracy_blank_image": answer_accuracy(unwrapped, processor, train_samples, blank=True),
            "heldout_accuracy": answer_accuracy(unwrapped, processor, eval_samples),
            "heldout_accuracy_blank_image": answer_accuracy(unwrapped, processor, eval_samples, blank=True),
            "final_loss": None if loss is None else float(loss.detach()),
            "steps": ckpt.state.step,
        }
        logger.info(f"metrics: {metrics}", main_process_only=True)
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=ckpt.state.step)
        unwrapped.save_pretrained(out / "model")
        save_vision_language_lora(unwrapped, out / "model")  # + peft's layout in model/lora
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    acc.end_training()
    return metrics


if __name__ == "__main__":
    main()
