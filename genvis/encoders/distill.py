"""Encoder distillation large -> small in two stages, after G2SD (Huang et al., "Generic-to-Specific Distillation of
Masked Autoencoders", CVPR 2023).

1. **Generic** (task-agnostic): the student's patch tokens and pooled token, mapped to the teacher's width by
   :class:`FeatureProjector` (linear layers, dropped afterwards), regress the frozen teacher's features with a cosine
   (default), MSE or smooth-L1 loss (:func:`feature_distillation_loss`). With ``mask_ratio > 0`` a random subset of the
   student's patches is replaced by its mask token and the student must predict the teacher's features of the hidden
   patches from context too (G2SD distils masked-image-modelling students; the teacher always sees the full image).
2. **Task-specific**: student and teacher classifiers (:class:`EncoderClassifier`); the student learns from the
   teacher's softened logits and the hard labels (:func:`task_distillation_loss`, Hinton KD:
   ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``).

Teacher and student may differ in width, depth, heads and patch size (features are compared on the teacher's patch
grid after resizing the student's grid). ``train/distill_encoder.py`` runs both stages on built-in data.
Tests: tests/efficiency/test_distill.py.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genvis.encoders.vit import VisionTransformerModel, VisionTransformerOutput

__all__ = [
    "EncoderClassifier",
    "FeatureProjector",
    "feature_distillation_loss",
    "random_patch_mask",
    "task_distillation_loss",
]

FeatureLoss = Literal["cosine", "mse", "smooth_l1"]


class FeatureProjector(nn.Module):
    """Linear maps from the student width to the teacher width (one for patch tokens, one for the pooled token).

    Args:
        student_dim: student token width.
        teacher_dim: teacher token width.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.patch = nn.Linear(student_dim, teacher_dim)
        self.pooled = nn.Linear(student_dim, teacher_dim)


class EncoderClassifier(nn.Module):
    """An encoder plus a linear head on its pooled output (CLS / mean / MAP as the encoder is configured).

    Args:
        encoder: a :class:`genvis.encoders.VisionTransformerModel` with a pooling head.
        num_classes: classes of the head.
    """

    def __init__(self, encoder: VisionTransformerModel, num_classes: int) -> None:
        super().__init__()
        if encoder.config.pooling_type == "none":
            raise ValueError("EncoderClassifier needs an encoder with pooling_type != 'none'")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Images (dense or packed) -> ``(num_segments, num_classes)`` logits."""
        return self.head(self.encoder(pixel_values, grid_thw).pooler_output)


def random_patch_mask(
    num_tokens: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(num_tokens,)`` bools with ``round(mask_ratio * num_tokens)`` True entries at random positions."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    order = torch.randperm(num_tokens, generator=generator)
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[order[: round(mask_ratio * num_tokens)]] = True
    return mask.to(device)


def _to_teacher_grid(
    student_patches: torch.Tensor, student: VisionTransformerOutput, teacher: VisionTransformerOutput
):
    """Resize each item's student patch grid to the teacher's grid (identity when the grids already agree)."""
    if torch.equal(student.grid_thw, teacher.grid_thw):
        return student_patches
    resized = []
    offsets = student.cu_seqlens.tolist()
    for index, ((t, h, w), (tt, th, tw)) in enumerate(zip(student.grid_thw.tolist(), teacher.grid_thw.tolist())):
        if t != tt:
            raise ValueError(f"item {index}: student has {t} frames of patches, teacher {tt}")
        grid = student_patches[offsets[index] : offsets[index + 1]].reshape(t, h, w, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(th, tw), mode="bilinear", align_corners=False)  # (t, D, th, tw)
        resized.append(grid.permute(0, 2, 3, 1).reshape(t * th * tw, -1))
    return torch.cat(resized)


def _per_token_loss(prediction: torch.Tensor, target: torch.Tensor, kind: FeatureLoss) -> torch.Tensor:
    """``(N, D)`` pairs -> ``(N,)`` losses."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(prediction, target, dim=-1)
    if kind == "mse":
        return F.mse_loss(prediction, target, reduction="none").mean(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prediction, target, reduction="none").mean(-1)
    raise ValueError(f"loss must be 'cosine', 'mse' or 'smooth_l1', got {kind!r}")


def feature_distillation_loss(
    student_output: VisionTransformerOutput,
    teacher_output: VisionTransformerOutput,
    projector: FeatureProjector,
    loss: FeatureLoss = "cosine",
    pooled_weight: float = 1.0,
    patch_mask: torch.Tensor | None = None,
    masked_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Generic-stage loss: projected student patch + pooled tokens against the (detached) teacher's.

    Args:
        student_output: output of the student encoder (``forward``, so ``pooler_output`` is filled).
        teacher_output: output of the teacher on the same images.
        projector: student -> teacher width maps.
        loss: ``"cosine"`` (``1 - cos``), ``"mse"`` or ``"smooth_l1"``; teacher targets are layer-normalised for the
            regression losses, as in MAE/G2SD feature targets.
        pooled_weight: weight of the pooled-token term (ignored when either model has no pooled output).
        patch_mask: ``(N_student,)`` bools of the patches the student saw as mask tokens; their term is weighted by
            ``masked_weight`` (the rest by 1).
        masked_weight: weight of the masked patches.

    Returns:
        The loss and a dict of its parts (``patch``, ``pooled``, ``cos_patch``).
    """
    teacher_patches = teacher_output.patch_tokens.detach()
    if loss != "cosine":
        teacher_patches = F.layer_norm(teacher_patches, teacher_patches.shape[-1:])
    predicted = projector.patch(student_output.patch_tokens)
    weights = None
    if patch_mask is not None:
        if patch_mask.shape != predicted.shape[:1]:
            raise ValueError(f"patch_mask must be ({predicted.shape[0]},) bools, got {tuple(patch_mask.shape)}")
        weights = 1 + (masked_weight - 1) * patch_mask.float()
    predicted = _to_teacher_grid(predicted, student_output, teacher_output)
    if weights is not None:
        weights = _to_teacher_grid(weights[:, None], student_output, teacher_output)[:, 0]
    per_token = _per_token_loss(predicted, teacher_patches, loss)
    patch_term = per_token.mean() if weights is None else (per_token * weights).sum() / weights.sum()
    total = patch_term
    parts = {"patch": patch_term.item()}
    if pooled_weight and student_output.pooler_output is not None and teacher_output.pooler_output is not None:
        teacher_pooled = teacher_output.pooler_output.detach()
        if loss != "cosine":
            teacher_pooled = F.layer_norm(teacher_pooled, teacher_pooled.shape[-1:])
        pooled_term = _per_token_loss(projector.pooled(student_output.pooler_output), teacher_pooled, loss).mean()
        total = total + pooled_weight * pooled_term
        parts["pooled"] = pooled_term.item()
    with torch.no_grad():
        parts["cos_patch"] = F.cosine_similarity(predicted, teacher_output.patch_tokens, dim=-1).mean().item()
    return total, parts


def task_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Task-specific stage: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)`` (detached here).
        labels: ``(B,)`` hard labels; required when ``alpha < 1``.
        temperature: softening temperature ``T``.
        alpha: weight of the soft (teacher) term.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must match, got {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"need temperature > 0 and alpha in [0, 1], got {temperature}, {alpha}")
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    if alpha == 1:
        return soft
    if labels is None:
        raise ValueError("labels are required when alpha < 1 (the hard-label term)")
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)
