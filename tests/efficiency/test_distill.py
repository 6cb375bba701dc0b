"""genvis.encoders.distill (G2SD generic + task-specific stages) and train/distill_encoder.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genvis.encoders import VisionTransformerModel
from genvis.encoders.distill import (
    EncoderClassifier,
    FeatureProjector,
    feature_distillation_loss,
    random_patch_mask,
    task_distillation_loss,
)

TRAIN_DIR = Path(__file__).resolve().parents[2] / "train"


def _vit(dim_heads=2, layers=2, patch=4, seed=0, **extra):
    torch.manual_seed(seed)
    return VisionTransformerModel(
        patch_size=patch,
        num_layers=layers,
        num_attention_heads=dim_heads,
        attention_head_dim=16,
        mlp_hidden_dim=64,
        **extra,
    )


def _images(batch=8):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_task_loss_matches_hinton_kd_and_ce():
    student, teacher = torch.randn(5, 6), torch.randn(5, 6)
    labels = torch.randint(0, 6, (5,))
    temperature = 3.0
    p_teacher = (teacher / temperature).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (student / temperature).log_softmax(-1))).sum(-1).mean() * temperature**2
    torch.testing.assert_close(task_distillation_loss(student, teacher, None, temperature, alpha=1.0), kl)
    torch.testing.assert_close(
        task_distillation_loss(student, teacher, labels, alpha=0.0), F.cross_entropy(student, labels)
    )
    assert task_distillation_loss(teacher, teacher, None, alpha=1.0).abs() < 1e-6
    with pytest.raises(ValueError, match="labels"):
        task_distillation_loss(student, teacher, None, alpha=0.5)
    with pytest.raises(ValueError, match="match"):
        task_distillation_loss(student, teacher[:, :3], labels)


def test_generic_distillation_improves_cosine_to_teacher():
    teacher = _vit(dim_heads=4, layers=3, patch=4, seed=0).eval().requires_grad_(False)
    student = _vit(dim_heads=2, layers=1, patch=8, seed=1)  # other width, depth and patch grid (4x4 vs 8x8)
    projector = FeatureProjector(student.dim, teacher.dim)
    images = _images()
    target = teacher(images)

    def cosine():
        with torch.no_grad():
            return feature_distillation_loss(student(images), target, projector)[1]["cos_patch"]

    before = cosine()
    optimizer = torch.optim.AdamW([*student.parameters(), *projector.parameters()], lr=3e-3)
    for _ in range(40):
        loss, _ = feature_distillation_loss(student(images), target, projector)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = cosine()
    assert after > before + 0.3, (before, after)


@pytest.mark.parametrize("kind", ["cosine", "mse", "smooth_l1"])
def test_masked_feature_loss(kind):
    teacher = _vit(seed=0).eval()
    student = _vit(seed=1, use_mask_token=True)
    projector = FeatureProjector(student.dim, teacher.dim)
    images = _images(2)
    mask = random_patch_mask(2 * 64, 0.5, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 64
    loss, parts = feature_distillation_loss(
        student(images, patch_mask=mask), teacher(images), projector, loss=kind, patch_mask=mask, masked_weight=2.0
    )
    loss.backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
    assert set(parts) == {"patch", "pooled", "cos_patch"}
    with pytest.raises(ValueError, match="loss must be"):
        feature_distillation_loss(student(images), teacher(images), projector, loss="l3")


def test_classifier_bad_input():
    with pytest.raises(ValueError, match="pooling_type"):
        EncoderClassifier(_vit(pooling_type="none"), 3)
    with pytest.raises(ValueError, match="num_classes"):
        EncoderClassifier(_vit(), 1)


@pytest.mark.slow
def test_distill_script_runs_stages_and_resumes(tmp_path):
    sys.path.insert(0, str(TRAIN_DIR))
    try:
        import distill_encoder
    finally:
        sys.path.pop(0)

    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "data.num_train_images=96",
        "data.num_eval_images=32",
        "teacher.steps=30",
        "distill.generic_steps=20",
        "distill.task_steps=10",
        "optim.batch_size=16",
        "eval_every_steps=100",
    ]
    argv = [arg for item in overrides for arg in ("--set", item)]
    metrics = distill_encoder.main(argv)
    for stage in ("teacher", "generic", "task", "scratch"):
        assert (tmp_path / "run" / stage / "encoder" / "config.json").is_file(), stage
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert metrics["cos_to_teacher_after"] > metrics["cos_to_teacher_before"]
    assert metrics["student_params"] < metrics["teacher_params"]
    assert {"teacher_accuracy", "student_accuracy", "scratch_accuracy"} <= set(metrics)
    # a re-run finds every stage done and reproduces the metrics without training
    assert distill_encoder.main(argv) == pytest.approx(metrics)
