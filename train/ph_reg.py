"""PH-Reg: retro-fit registers into a frozen ViT by self-distillation (arXiv 2505.21501).

    accelerate launch train/ph_reg.py --config train/configs/ph_reg/tiny.yaml [--set optim.lr=1e-3 ...]

Teacher: ``model.teacher`` = a genvis ``save_pretrained`` folder, a transformers vision checkpoint folder (imported by
``genvis.encoders.convert_transformers``), or ``"toy"``: a tiny encoder with a synthetic position-locked artifact (the
CPU demo). Student: the teacher plus ``model.num_new_registers`` registers; only the registers, learned position
embedding, patch embedding and last block train. Each step the frozen teacher's test-time-augmentation denoised
features (shifted/flipped views averaged back on the original grid) are the targets of ``(1 - cos) + mse_weight*MSE``.
Every ``eval_every_steps`` the teacher-vs-student artifact ratio (artifact-position norm / median norm) and the cosine
to the teacher elsewhere are logged. Checkpoints are atomic and a run resumes from the latest complete one; the
student is exported as ``<output_dir>/student`` (``save_pretrained``) plus ``ph_reg_trainable.safetensors``.
Data: procedural scenes (genvis.data.builtin), normalised to [-1, 1].
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from safetensors.torch import save_file

from genvis.data.builtin import procedural_scene
from genvis.encoders import VisionTransformerModel
from genvis.encoders.convert_transformers import load_transformers_vision_model
from genvis.encoders.ph_reg import (
    add_register_tokens,
    artifact_report,
    dense_patch_features,
    ph_reg_loss,
    tta_denoise,
    unlock_ph_reg_parameters,
)
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


@dataclass
class ModelConfig:
    teacher: str = "toy"  # "toy", a genvis save_pretrained folder or a transformers checkpoint folder
    num_new_registers: int = 4  # PH-Reg uses 16 on DINOv2-B; 4 suffice for the toy
    toy_artifact_positions: list[int] = field(default_factory=lambda: [10, 27, 44])
    toy_artifact_norm: float = 20.0


@dataclass
class DataConfig:
    image_size: int = 32
    num_train_images: int = 256
    num_eval_images: int = 16


@dataclass
class DistillConfig:
    num_views: int = 10
    max_shift_fraction: float = 0.3  # 0.15 in the paper at 37x37 patches; a toy 8x8 grid needs larger shifts
    flip: bool = True
    mse_weight: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 5e-3
    weight_decay: float = 1e-2
    batch_size: int = 16
    max_grad_norm: float = 1.0


@dataclass
class ScheduleConfig:
    max_steps: int = 200


@dataclass
class LoggingConfig:
    eval_every_steps: int = 50


@dataclass
class TrainConfig:
    output_dir: str = "runs/ph_reg"
    seed: int = 0
    mixed_precision: str = "no"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def toy_teacher(config: ModelConfig, image_size: int) -> VisionTransformerModel:
    """A tiny encoder whose output has a large vector locked to a few grid positions (the artifact to remove)."""
    generator = torch.Generator().manual_seed(0)
    grid = image_size // 4
    teacher = VisionTransformerModel(
        patch_size=4,
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=16,
        mlp_hidden_dim=64,
        position_embedding_type="learned",
        pos_embed_grid_size=[grid, grid],
        pos_embed_cls=True,
        final_norm="none",
    )
    with torch.no_grad():
        teacher.patch_embed.proj.weight.mul_(8.0)  # content-dominated features, as in a trained encoder
        direction = torch.randn(teacher.dim, generator=generator)
        rows = [1 + p for p in config.toy_artifact_positions]
        teacher.pos_embed[rows] += config.toy_artifact_norm * direction / direction.norm()
    return teacher


def load_teacher(config: ModelConfig, image_size: int) -> VisionTransformerModel:
    if config.teacher == "toy":
        return toy_teacher(config, image_size)
    folder = Path(config.teacher)
    if (folder / "diffusion_pytorch_model.safetensors").is_file():
        return VisionTransformerModel.from_pretrained(folder)
    return load_transformers_vision_model(folder)


def scene_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``(count, 3, size, size)`` procedural scenes in [-1, 1]."""
    scenes = np.stack([procedural_scene(seed + i, size).image for i in range(count)])
    return torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 127.5 - 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_config=Path(__file__).parent / "configs/ph_reg/tiny.yaml")
    config: TrainConfig = config_from_args(TrainConfig, parser.parse_args(argv))
    accelerator = setup_accelerator(
        config.output_dir,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        config=config_to_dict(config),
        project_name="ph_reg",
    )

    # 1. teacher (frozen) and student (teacher + new registers, PH-Reg parts unlocked)
    teacher = load_teacher(config.model, config.data.image_size).eval().requires_grad_(False)
    teacher.to(accelerator.device)
    student = add_register_tokens(teacher, config.model.num_new_registers, torch.Generator().manual_seed(config.seed))
    trainable = unlock_ph_reg_parameters(student)
    logger.info(f"trainable: {trainable}", main_process_only=True)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    patch = teacher.config.patch_size

    # 2. data: a fixed pool of procedural scenes (train) and held-out scenes (eval)
    train_images = scene_images(config.data.num_train_images, config.data.image_size, seed=0)
    eval_images = scene_images(config.data.num_eval_images, config.data.image_size, seed=10**6).to(accelerator.device)

    def teacher_features(images: torch.Tensor) -> torch.Tensor:
        return dense_patch_features(teacher, images)

    # white is the fill value of uncovered pixels in the official recipe; our images are in [-1, 1]
    fill_value = 1.0
    manager = CheckpointManager(accelerator, Path(config.output_dir) / "checkpoints", config.checkpoint.total_limit)
    if config.checkpoint.resume:
        manager.resume()
    state = manager.state
    guard = NonFiniteGuard(accelerator)

    def export(folder: Path) -> None:
        unwrapped = accelerator.unwrap_model(student)
        unwrapped.save_pretrained(folder / "student")
        params = {n: p.detach().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
        save_file(params, str(folder / "ph_reg_trainable.safetensors"))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model = accelerator.unwrap_model(student).eval()
        before, after = teacher_features(eval_images), dense_patch_features(model, eval_images)
        model.train()
        metrics = {
            "eval/teacher_artifact_ratio": artifact_report(before)["ratio"].mean().item(),
            "eval/student_artifact_ratio": artifact_report(after)["ratio"].mean().item(),
            "eval/cos_to_teacher": F.cosine_similarity(after, before, dim=-1).median().item(),
        }
        if config.model.teacher == "toy":
            positions = torch.tensor(config.model.toy_artifact_positions)
            for name, feats in (("teacher", before), ("student", after)):
                norms = feats.norm(dim=-1)
                metrics[f"eval/{name}_artifact_norm"] = (norms[:, positions].mean() / norms.median()).item()
        return metrics

    # 3. the loop
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    bar = progress_bar(accelerator, config.schedule.max_steps, initial=state.step, desc="ph_reg")
    student.train()
    while state.step < config.schedule.max_steps:
        index = torch.randint(0, len(train_images), (config.optim.batch_size,), generator=generator)
        images = train_images[index].to(accelerator.device)
        targets, _ = tta_denoise(
            teacher_features,
            images,
            patch,
            num_views=config.distill.num_views,
            max_shift_fraction=config.distill.max_shift_fraction,
            flip=config.distill.flip,
            fill_value=fill_value,
            generator=generator,
        )
        with accelerator.autocast():
            loss = ph_reg_loss(dense_patch_features(student, images), targets, config.distill.mse_weight)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), config.optim.max_grad_norm)
        if guard.check(loss, grad_norm, step=state.step):
            optimizer.step()
        optimizer.zero_grad()
        state.step += 1
        state.samples_seen += config.optim.batch_size * accelerator.num_processes
        state.skipped_steps = guard.total_skipped
        bar.update(1)
        logs = {"loss": loss.item()}
        if state.step % config.logging.eval_every_steps == 0 or state.step == config.schedule.max_steps:
            logs.update(evaluate())
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
