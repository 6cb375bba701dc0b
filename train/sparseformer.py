"""Bootstrap a SparseFormer from a genvis ViT teacher (Gao et al., CVPR 2024): align 49 latent tokens with the teacher.

    accelerate launch train/sparseformer.py [--config train/configs/sparseformer/tiny.yaml] [--set optim.lr=1e-3 ...]

Teacher: ``model.teacher`` = a genvis ``save_pretrained`` folder, or ``"shapes"``: a tiny ViT (64 px, patch 4 -> 256
tokens) first trained for ``teacher.steps`` steps to recognise which shape kinds and colours a procedural scene
contains (9-way multi-label, BCE on its CLS). A random-init teacher's CLS is mostly position-driven; the short
pretraining makes its representation depend on image content, which is what the student must recover. The trained
teacher and its probe head are saved under ``<output_dir>/teacher`` and reused on resume.

Student: :meth:`genvis.models.sparseformer.SparseFormerModel.from_vit` (teacher's last 2/3 blocks, final norm, CLS,
patch embedding and position grid inherited and frozen; focusing transformer, RoIs and ``align_proj`` trainable).
Loss: ``1 - cos`` between the student's and the teacher's pooled (normed CLS) outputs (+ ``mse_weight`` * MSE), no
labels. Every ``eval_every_steps`` on held-out scenes: mean cosine of the student, of 49 random, 7x7-pooled and 7x7-grid
(bilinear at the initial RoI centres) teacher tokens (all through all teacher blocks), and the teacher probe's accuracy
on teacher and student features.
Data: procedural scenes (genvis.data.builtin) plus the built-in real images, normalised to [-1, 1], random flips.
Checkpoints are atomic and resume; the student is exported as ``<output_dir>/student`` (``save_pretrained``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file

from genvis.data.builtin import SHAPE_COLORS, SHAPE_KINDS, builtin_images, procedural_scene
from genvis.encoders import VisionTransformerModel
from genvis.models.sparseformer import SparseFormerModel, sparseformer_alignment_loss, token_subset_baseline
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

NUM_SHAPE_LABELS = len(SHAPE_KINDS) + len(SHAPE_COLORS)


@dataclass
class ModelConfig:
    teacher: str = "shapes"  # "shapes" (tiny ViT trained here) or a genvis save_pretrained folder
    num_latent_tokens: int = 49
    num_cortex_layers: int | None = None  # default: 2/3 of the teacher depth
    trainable_cortex_layers: int = 0
    focus_dim: int = 16
    num_focus_repeats: int = 2
    num_sampling_points: int = 9
    mixing_dim: int = 8
    mixing_out_points: int = 4


@dataclass
class TeacherConfig:
    """The "shapes" teacher: a small genvis ViT and its multi-label pretraining."""

    patch_size: int = 4
    num_layers: int = 3
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    mlp_hidden_dim: int = 128
    steps: int = 150
    batch_size: int = 32
    lr: float = 3e-3


@dataclass
class DataConfig:
    image_size: int = 64
    num_train_images: int = 512
    num_eval_images: int = 64
    use_builtin_images: bool = True


@dataclass
class DistillConfig:
    mse_weight: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    max_grad_norm: float = 1.0


@dataclass
class ScheduleConfig:
    max_steps: int = 150


@dataclass
class LoggingConfig:
    eval_every_steps: int = 50


@dataclass
class TrainConfig:
    output_dir: str = "runs/sparseformer"
    seed: int = 0
    mixed_precision: str = "no"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def scene_batch(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` procedural scenes: images ``(count, 3, size, size)`` in [-1, 1] and multi-hot labels
    ``(count, 9)``: which shape kinds and which shape colours are present."""
    kinds, colors = list(SHAPE_KINDS), list(SHAPE_COLORS)
    images, labels = [], torch.zeros(count, NUM_SHAPE_LABELS)
    for i in range(count):
        scene = procedural_scene(seed + i, size)
        images.append(scene.image)
        for shape in scene.shapes:
            labels[i, kinds.index(shape.kind)] = 1
            labels[i, len(kinds) + colors.index(shape.color)] = 1
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1, labels


def real_images(size: int) -> torch.Tensor:
    """The built-in real photographs as ``(M, 3, size, size)`` in [-1, 1]."""
    stacked = np.stack([image for _, image in builtin_images(size)])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 127.5 - 1


def shapes_teacher(config: TeacherConfig, image_size: int) -> VisionTransformerModel:
    """The untrained tiny teacher ViT (learned position grid with a CLS row, CLS pooling)."""
    if image_size % config.patch_size:
        raise ValueError(
            f"data.image_size ({image_size}) must be a multiple of teacher.patch_size ({config.patch_size})"
        )
    grid = image_size // config.patch_size
    return VisionTransformerModel(
        patch_size=config.patch_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        mlp_hidden_dim=config.mlp_hidden_dim,
        position_embedding_type="learned",
        pos_embed_grid_size=[grid, grid],
        pos_embed_cls=True,
    )


def pretrain_shapes_teacher(
    config: TeacherConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[VisionTransformerModel, torch.nn.Linear]:
    """Train the tiny teacher + a linear probe on its pooled output (multi-label BCE); returns both in eval mode."""
    torch.manual_seed(seed)
    teacher = shapes_teacher(config, images.shape[-1]).to(images.device)
    head = torch.nn.Linear(teacher.dim, labels.shape[-1]).to(images.device)
    optimizer = torch.optim.AdamW([*teacher.parameters(), *head.parameters()], lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    for _ in tqdm(range(config.steps), desc="teacher", disable=not show_progress):
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        logits = head(teacher(images[index]).pooler_output)
        loss = F.binary_cross_entropy_with_logits(logits, labels[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    return teacher.eval().requires_grad_(False), head.eval().requires_grad_(False)


def build_student(teacher: VisionTransformerModel, config: ModelConfig) -> SparseFormerModel:
    return SparseFormerModel.from_vit(
        teacher,
        num_latent_tokens=config.num_latent_tokens,
        num_cortex_layers=config.num_cortex_layers,
        trainable_cortex_layers=config.trainable_cortex_layers,
        focus_dim=config.focus_dim,
        num_focus_repeats=config.num_focus_repeats,
        num_sampling_points=config.num_sampling_points,
        mixing_dim=config.mixing_dim,
        mixing_out_points=config.mixing_out_points,
    )


@torch.no_grad()
def evaluate_alignment(
    student: SparseFormerModel,
    teacher: VisionTransformerModel,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    head: torch.nn.Linear | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out mean cosine to the teacher's pooled output: the student vs 49 random / 7x7-pooled / 7x7-grid teacher
    tokens (all through the teacher's blocks).

    With ``labels`` and the teacher's probe ``head``, also the probe's multi-label accuracy on teacher and student
    features.
    """
    was_training = student.training
    student.eval()
    target = teacher(images).pooler_output
    num = student.config.num_latent_tokens
    generator = torch.Generator().manual_seed(seed)
    outputs = {
        "student": student(images).pooler_output,
        "random_tokens": token_subset_baseline(teacher, images, num, "random", generator),
        "pooled_tokens": token_subset_baseline(teacher, images, num, "pool"),
        "grid_tokens": token_subset_baseline(teacher, images, num, "grid"),
    }
    student.train(was_training)
    metrics = {f"cos/{k}": F.cosine_similarity(v, target, dim=-1).mean().item() for k, v in outputs.items()}
    if labels is not None and head is not None:
        for name, features in (("teacher", target), ("student", outputs["student"])):
            metrics[f"probe_acc/{name}"] = ((head(features) > 0).float() == labels).float().mean().item()
    return metrics


def load_or_train_teacher(
    config: TrainConfig, images: torch.Tensor, labels: torch.Tensor, show_progress: bool
) -> tuple[VisionTransformerModel, torch.nn.Linear | None]:
    """A saved teacher (``model.teacher`` folder, or ``<output_dir>/teacher`` from an earlier run) or a fresh one."""
    if config.model.teacher != "shapes":
        return VisionTransformerModel.from_pretrained(config.model.teacher).eval().requires_grad_(False), None
    folder = Path(config.output_dir) / "teacher"
    if (folder / "probe_head.safetensors").is_file():
        teacher = VisionTransformerModel.from_pretrained(folder).eval().requires_grad_(False)
        head = torch.nn.Linear(teacher.dim, NUM_SHAPE_LABELS)
        head.load_state_dict(load_file(str(folder / "probe_head.safetensors")))
        return teacher, head.eval().requires_grad_(False)
    teacher, head = pretrain_shapes_teacher(config.teacher, images, labels, config.seed, show_progress)
    return teacher, head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_config=Path(__file__).parent / "configs/sparseformer/tiny.yaml")
    config: TrainConfig = config_from_args(TrainConfig, parser.parse_args(argv))
    accelerator = setup_accelerator(
        config.output_dir,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        config=config_to_dict(config),
        project_name="sparseformer",
    )
    device = accelerator.device

    # 1. data: procedural scenes with shape labels (train / held-out) and the built-in real images
    size = config.data.image_size
    train_images, train_labels = scene_batch(config.data.num_train_images, size, seed=0)
    eval_images, eval_labels = scene_batch(config.data.num_eval_images, size, seed=10**6)
    eval_images, eval_labels = eval_images.to(device), eval_labels.to(device)
    pool = torch.cat([train_images, real_images(size)]) if config.data.use_builtin_images else train_images

    # 2. teacher (trained on the shape task once, saved, frozen) and the bootstrapped student
    teacher, head = load_or_train_teacher(
        config, train_images.to(device), train_labels.to(device), accelerator.is_local_main_process
    )
    teacher.to(device)
    if head is not None:
        head.to(device)
    teacher_dir = Path(config.output_dir) / "teacher"
    if config.model.teacher == "shapes" and accelerator.is_main_process and not teacher_dir.is_dir():
        teacher.save_pretrained(teacher_dir)
        save_file(
            {k: v.contiguous() for k, v in head.state_dict().items()}, str(teacher_dir / "probe_head.safetensors")
        )
    student = build_student(teacher, config.model)
    trainable = [name for name, p in student.named_parameters() if p.requires_grad]
    logger.info(f"{len(trainable)} trainable tensors: {trainable}", main_process_only=True)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.optim.lr, total_steps=config.schedule.max_steps, pct_start=0.1
    )
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)

    manager = CheckpointManager(accelerator, Path(config.output_dir) / "checkpoints", config.checkpoint.total_limit)
    if config.checkpoint.resume:
        manager.resume()
    state = manager.state
    guard = NonFiniteGuard(accelerator)

    def export(folder: Path) -> None:
        accelerator.unwrap_model(student).save_pretrained(folder / "student")

    # 3. the loop: align the student's pooled output with the frozen teacher's, no labels
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index + state.step)
    bar = progress_bar(accelerator, config.schedule.max_steps, initial=state.step, desc="sparseformer")
    student.train()
    while state.step < config.schedule.max_steps:
        index = torch.randint(0, len(pool), (config.optim.batch_size,), generator=generator)
        images = pool[index]
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images).to(device)
        with torch.no_grad():
            target = teacher(images).pooler_output
        with accelerator.autocast():
            loss = sparseformer_alignment_loss(student(images).pooler_output, target, config.distill.mse_weight)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), config.optim.max_grad_norm)
        if guard.check(loss, grad_norm, step=state.step):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state.step += 1
        state.samples_seen += config.optim.batch_size * accelerator.num_processes
        state.skipped_steps = guard.total_skipped
        bar.update(1)
        logs = {"loss": loss.item()}
        if state.step % config.logging.eval_every_steps == 0 or state.step == config.schedule.max_steps:
            model = accelerator.unwrap_model(student)
            logs.update(
                {f"eval/{k}": v for k, v in evaluate_alignment(model, teacher, eval_images, eval_labels, head).items()}
            )
            bar.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        accelerator.log(logs, step=state.step)
        if state.step % config.checkpoint.every_steps == 0:
            manager.save(extra_marker={"config": config_to_dict(config)}, export_fn=export)

    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export(Path(config.output_dir))
    accelerator.end_training()


if __name__ == "__main__":
    main()
