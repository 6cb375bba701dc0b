"""Encoder distillation large -> small (G2SD-style generic then task-specific stage) on built-in data.

    accelerate launch train/distill_encoder.py [--config train/configs/distill_encoder/tiny.yaml] [--set k=v ...]

Task: colour of the front-most shape in procedural scenes (genvis.data.builtin, 6 classes, exact labels, no
download). Stages, each exported to ``<output_dir>/<stage>/`` (``encoder/`` via ``save_pretrained``,
``head.safetensors``, ``metrics.json``); a re-run skips stages that finished (resume at stage granularity):

1. ``teacher``: ``teacher.source="train"`` trains the larger encoder + linear head with cross-entropy for
   ``teacher.steps`` (a brief supervised pre-training standing in for a foundation model, which cannot be downloaded
   here), or loads a ``teacher`` stage folder written by an earlier run.
2. ``generic``: the student encoder and a projector regress the frozen teacher's patch and pooled features
   (``distill.loss``, optional MAE-style ``distill.mask_ratio``) for ``distill.generic_steps``; logs the cosine to
   the teacher before and after.
3. ``task``: student + head trained with ``alpha * KD(teacher logits, T) + (1 - alpha) * CE`` for
   ``distill.task_steps``.
4. ``scratch`` (``distill.baseline``): the same student architecture trained with cross-entropy only for
   ``generic_steps + task_steps`` steps, from the same init: the equal-step peer.

``<output_dir>/metrics.json`` gathers held-out accuracies (teacher, distilled student, scratch student) and the
student/teacher feature cosine. Library code: genvis.encoders.distill.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file

from genvis.data.builtin import SHAPE_COLORS, procedural_scene
from genvis.encoders import VisionTransformerModel
from genvis.encoders.distill import (
    EncoderClassifier,
    FeatureProjector,
    feature_distillation_loss,
    random_patch_mask,
    task_distillation_loss,
)
from genvis.training import add_config_arguments, config_from_args, config_to_dict, progress_bar, setup_accelerator

logger = get_logger(__name__)
CLASSES: list[str] = list(SHAPE_COLORS)


@dataclass
class ModelConfig:
    teacher: dict[str, Any] = field(
        default_factory=lambda: {
            "patch_size": 4,
            "num_layers": 4,
            "num_attention_heads": 4,
            "attention_head_dim": 16,
            "mlp_hidden_dim": 256,
        }
    )
    student: dict[str, Any] = field(
        default_factory=lambda: {
            "patch_size": 4,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "mlp_hidden_dim": 64,
        }
    )


@dataclass
class DataConfig:
    image_size: int = 32
    num_train_images: int = 1024
    num_eval_images: int = 256
    num_shapes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class TeacherConfig:
    source: str = "train"  # "train" or a teacher stage folder (encoder/ + head.safetensors) of an earlier run
    steps: int = 300
    lr: float = 3e-3


@dataclass
class DistillConfig:
    generic_steps: int = 150
    task_steps: int = 150
    loss: str = "cosine"  # cosine | mse | smooth_l1
    pooled_weight: float = 1.0
    mask_ratio: float = 0.0  # > 0 needs student use_mask_token
    temperature: float = 2.0
    alpha: float = 0.5
    baseline: bool = True


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/distill_encoder"
    seed: int = 0
    mixed_precision: str = "no"
    eval_every_steps: int = 50
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def scene_dataset(count: int, size: int, seed: int, num_shapes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, 3, size, size)`` scenes in [-1, 1] and the colour index of each front-most shape."""
    images, labels = [], []
    for index in range(count):
        scene = procedural_scene(seed + index, size, num_shapes=tuple(num_shapes))
        images.append(scene.image)
        labels.append(CLASSES.index(scene.shapes[-1].color))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, torch.tensor(labels)


def build_classifier(encoder_kwargs: dict[str, Any], seed: int) -> EncoderClassifier:
    torch.manual_seed(seed)
    return EncoderClassifier(VisionTransformerModel(**encoder_kwargs), len(CLASSES))


def save_stage(folder: Path, classifier: EncoderClassifier, metrics: dict[str, float]) -> None:
    classifier.encoder.save_pretrained(folder / "encoder")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in classifier.head.state_dict().items()},
        folder / "head.safetensors",
    )
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_stage(folder: Path) -> tuple[EncoderClassifier, dict[str, float]]:
    for name in ("encoder", "head.safetensors", "metrics.json"):
        if not (folder / name).exists():
            raise ValueError(f"{folder}: not a finished stage folder (missing {name})")
    classifier = EncoderClassifier(VisionTransformerModel.from_pretrained(folder / "encoder"), len(CLASSES))
    classifier.head.load_state_dict(load_file(folder / "head.safetensors"))
    return classifier, json.loads((folder / "metrics.json").read_text())


@torch.no_grad()
def accuracy(classifier: EncoderClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 128) -> float:
    was_training = classifier.training
    classifier.eval()
    correct = sum(
        (classifier(images[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    classifier.train(was_training)
    return correct / len(images)


@torch.no_grad()
def teacher_cosine(student, projector, teacher, images: torch.Tensor) -> float:
    _, parts = feature_distillation_loss(student(images), teacher(images), projector)
    return parts["cos_patch"]


class GenericDistiller(torch.nn.Module):
    """Student encoder + projector in one module whose forward returns the generic loss (one DDP wrapper for both)."""

    def __init__(self, encoder: VisionTransformerModel, projector: FeatureProjector, config: DistillConfig) -> None:
        super().__init__()
        self.encoder, self.projector, self.config = encoder, projector, config

    def forward(self, images: torch.Tensor, target, patch_mask: torch.Tensor | None = None):
        output = self.encoder(images, patch_mask=patch_mask)
        return feature_distillation_loss(
            output,
            target,
            self.projector,
            loss=self.config.loss,
            pooled_weight=self.config.pooled_weight,
            patch_mask=patch_mask,
        )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_config=Path(__file__).parent / "configs/distill_encoder/tiny.yaml")
    config: TrainConfig = config_from_args(TrainConfig, parser.parse_args(argv))
    if config.distill.loss not in ("cosine", "mse", "smooth_l1"):
        raise ValueError(f"distill.loss must be 'cosine', 'mse' or 'smooth_l1', got {config.distill.loss!r}")
    accelerator = setup_accelerator(
        config.output_dir,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        config=config_to_dict(config),
        project_name="distill_encoder",
    )
    output_dir = Path(config.output_dir)
    device = accelerator.device
    data = config.data
    train_x, train_y = scene_dataset(data.num_train_images, data.image_size, 0, data.num_shapes)
    eval_x, eval_y = scene_dataset(data.num_eval_images, data.image_size, 10**6, data.num_shapes)
    eval_x, eval_y = eval_x.to(device), eval_y.to(device)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)

    def run_stage(
        name: str,
        modules: list[torch.nn.Module],
        steps: int,
        lr: float,
        step_loss: Callable[[list, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
        evaluate: Callable[[], dict[str, float]],
    ) -> None:
        """One optimisation stage over ``modules`` (trainable params only), with progress and periodic eval.

        ``step_loss(prepared_modules, images, labels)`` must call the prepared (possibly DDP-wrapped) modules.
        """
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.optim.weight_decay)
        warmup = max(1, steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: (
                min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(steps, 1))))
            ),
        )  # linear warm-up, cosine decay
        prepared = accelerator.prepare(*modules, optimizer, scheduler)
        wrapped, optimizer, scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
        bar = progress_bar(accelerator, steps, desc=name)
        for step in range(1, steps + 1):
            index = torch.randint(0, len(train_x), (config.optim.batch_size,), generator=generator)
            with accelerator.autocast():
                loss, logs = step_loss(wrapped, train_x[index].to(device), train_y[index].to(device))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, config.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            logs = {f"{name}/{k}": v for k, v in {"loss": loss.item(), **logs}.items()}
            if step % config.eval_every_steps == 0 or step == steps:
                logs.update({f"{name}/{k}": v for k, v in evaluate().items()})
                bar.write(f"{name} step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))
            accelerator.log(logs)
            bar.update(1)
        bar.close()

    # 1. teacher
    teacher_dir = output_dir / "teacher"
    if config.teacher.source != "train":
        teacher, teacher_metrics = load_stage(Path(config.teacher.source))
    elif (teacher_dir / "metrics.json").is_file():
        teacher, teacher_metrics = load_stage(teacher_dir)
        logger.info(f"teacher stage already done: {teacher_metrics}", main_process_only=True)
    else:
        teacher = build_classifier(config.model.teacher, config.seed).to(device)
        run_stage(
            "teacher",
            [teacher],
            config.teacher.steps,
            config.teacher.lr,
            lambda mods, x, y: (F.cross_entropy(mods[0](x), y), {}),
            lambda: {"accuracy": accuracy(teacher, eval_x, eval_y)},
        )
        teacher = accelerator.unwrap_model(teacher)
        teacher_metrics = {"accuracy": accuracy(teacher, eval_x, eval_y), "steps": config.teacher.steps}
        if accelerator.is_main_process:
            save_stage(teacher_dir, teacher, teacher_metrics)
    teacher = teacher.to(device).eval().requires_grad_(False)

    # 2. generic distillation: student features -> teacher features
    student_seed = config.seed + 1
    generic_dir = output_dir / "generic"
    student = build_classifier(config.model.student, student_seed).to(device)
    projector = FeatureProjector(student.encoder.dim, teacher.encoder.dim).to(device)
    cos_before = teacher_cosine(student.encoder, projector, teacher.encoder, eval_x)
    if (generic_dir / "metrics.json").is_file():
        student, generic_metrics = load_stage(generic_dir)
        student = student.to(device)
    else:
        mask_ratio = config.distill.mask_ratio
        if mask_ratio > 0 and not student.encoder.config.use_mask_token:
            raise ValueError("distill.mask_ratio > 0 needs model.student.use_mask_token: true")

        distiller = GenericDistiller(student.encoder, projector, config.distill)

        def generic_loss(mods, images, _labels):
            mask = None
            if mask_ratio > 0:
                grid = data.image_size // student.encoder.config.patch_size
                mask = random_patch_mask(len(images) * grid * grid, mask_ratio, device, generator)
            with torch.no_grad():
                target = teacher.encoder(images)
            return mods[0](images, target, mask)

        run_stage(
            "generic",
            [distiller],
            config.distill.generic_steps,
            config.optim.lr,
            generic_loss,
            lambda: {"cos_to_teacher": teacher_cosine(student.encoder, projector, teacher.encoder, eval_x)},
        )
        generic_metrics = {
            "cos_to_teacher_before": cos_before,
            "cos_to_teacher_after": teacher_cosine(student.encoder, projector, teacher.encoder, eval_x),
        }
        if accelerator.is_main_process:
            save_stage(generic_dir, student, generic_metrics)

    # 3. task-specific distillation: KD on the teacher's logits + hard labels
    task_dir = output_dir / "task"
    if (task_dir / "metrics.json").is_file():
        student, task_metrics = load_stage(task_dir)
    else:
        distill = config.distill
        run_stage(
            "task",
            [student],
            distill.task_steps,
            config.optim.lr,
            lambda mods, x, y: (
                task_distillation_loss(mods[0](x), teacher(x), y, distill.temperature, distill.alpha),
                {},
            ),
            lambda: {"accuracy": accuracy(student, eval_x, eval_y)},
        )
        student = accelerator.unwrap_model(student)
        task_metrics = {"accuracy": accuracy(student, eval_x, eval_y)}
        if accelerator.is_main_process:
            save_stage(task_dir, student, task_metrics)

    # 4. equal-step peer: the same student from the same init, cross-entropy only
    metrics = {
        "teacher_accuracy": teacher_metrics["accuracy"],
        "student_accuracy": task_metrics["accuracy"],
        "cos_to_teacher_before": generic_metrics["cos_to_teacher_before"],
        "cos_to_teacher_after": generic_metrics["cos_to_teacher_after"],
        "teacher_params": sum(p.numel() for p in teacher.encoder.parameters()),
        "student_params": sum(p.numel() for p in student.encoder.parameters()),
    }
    if config.distill.baseline:
        scratch_dir = output_dir / "scratch"
        if (scratch_dir / "metrics.json").is_file():
            _, scratch_metrics = load_stage(scratch_dir)
        else:
            scratch = build_classifier(config.model.student, student_seed).to(device)
            steps = config.distill.generic_steps + config.distill.task_steps
            run_stage(
                "scratch",
                [scratch],
                steps,
                config.optim.lr,
                lambda mods, x, y: (F.cross_entropy(mods[0](x), y), {}),
                lambda: {"accuracy": accuracy(scratch, eval_x, eval_y)},
            )
            scratch = accelerator.unwrap_model(scratch)
            scratch_metrics = {"accuracy": accuracy(scratch, eval_x, eval_y), "steps": steps}
            if accelerator.is_main_process:
                save_stage(scratch_dir, scratch, scratch_metrics)
        metrics["scratch_accuracy"] = scratch_metrics["accuracy"]
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"distillation metrics: {metrics}", main_process_only=True)
        print(json.dumps(metrics, indent=2))
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
