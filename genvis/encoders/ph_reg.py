"""PH-Reg: post-hoc registers by self-distillation (Chen et al., "Vision Transformers with Self-Distilled Registers",
arXiv 2505.21501, NeurIPS 2025), written from the paper and the description of the official code's recipe.

- :func:`tta_denoise`: the frozen teacher sees ``num_views`` shifted (integer patch offsets, farthest-point sampled,
  the first view unshifted) and optionally horizontally flipped copies of each image; each view's patch features are
  mapped back to the original grid and averaged over the views that cover a position. Position-locked artifacts move
  with the view and are diluted; content-locked features add up.
- :func:`add_register_tokens`: the student = the teacher plus new registers (init ``randn / sqrt(D)``).
- :func:`unlock_ph_reg_parameters`: only the registers, the learned position embedding, the patch embedding and the
  last block train; everything else stays frozen.
- :func:`ph_reg_loss`: ``(1 - mean cos(student, target)) + mse_weight * MSE(student, target)`` on patch tokens.
- :func:`artifact_report`: per-image token-norm statistics (max/median ratio, fraction above ``k x`` median).

The training loop is ``train/ph_reg.py``. Tested in tests/encoders/test_ph_reg.py: exact TTA geometry on an
equivariant teacher, and a tiny encoder with a synthetic position-locked artifact whose artifact norm drops after
distillation while the other features stay close to the teacher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from genvis.encoders.vit import VisionTransformerModel

__all__ = [
    "PH_REG_PARTS",
    "add_register_tokens",
    "artifact_report",
    "dense_patch_features",
    "ph_reg_loss",
    "sample_view_offsets",
    "shift_flip_views",
    "tta_denoise",
    "unlock_ph_reg_parameters",
]

PH_REG_PARTS: tuple[str, ...] = ("registers", "pos_embed", "patch_embed", "last_block")


def sample_view_offsets(
    num_views: int, max_shift: int, generator: torch.Generator | None = None, pool_size: int = 100
) -> torch.Tensor:
    """``(num_views, 2)`` integer ``(dy, dx)`` patch offsets in ``[-max_shift, max_shift]``, spread out by
    farthest-point sampling from a random pool; the first view is ``(0, 0)``."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    pool = torch.randint(-max_shift, max_shift + 1, (pool_size, 2), generator=generator)
    chosen = [torch.zeros(2, dtype=torch.long)]
    distance = (pool - chosen[0]).float().norm(dim=-1)
    for _ in range(num_views - 1):
        index = int(distance.argmax())
        chosen.append(pool[index])
        distance = torch.minimum(distance, (pool - pool[index]).float().norm(dim=-1))
    return torch.stack(chosen)


def shift_flip_views(
    images: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    patch_size: int,
    fill_value: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted/flipped copies of ``images (B, C, H, W)`` and where each view patch comes from.

    View ``v`` moves the content by ``offsets[v] * patch_size`` pixels (uncovered pixels get ``fill_value``), then
    flips horizontally when ``flips[v]``.

    Returns:
        ``views (V * B, C, H, W)`` view-major, and ``source_index (V, h * w)``: the original raster patch index
        shown at each view patch, ``-1`` where the view shows fill.
    """
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} must be a multiple of patch_size={patch_size}")
    h, w = H // patch_size, W // patch_size
    fill = torch.as_tensor(fill_value, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    rows = torch.arange(h, device=images.device)[:, None].expand(h, w)
    cols = torch.arange(w, device=images.device)[None, :].expand(h, w)
    views, sources = [], []
    for (dy, dx), flip in zip(offsets.tolist(), flips.tolist()):
        shifted = torch.roll(images, shifts=(dy * patch_size, dx * patch_size), dims=(-2, -1))
        valid = torch.ones(H, W, dtype=torch.bool, device=images.device)
        if dy > 0:
            valid[: dy * patch_size] = False
        elif dy < 0:
            valid[dy * patch_size :] = False
        if dx > 0:
            valid[:, : dx * patch_size] = False
        elif dx < 0:
            valid[:, dx * patch_size :] = False
        shifted = torch.where(valid, shifted, fill)
        view_cols = (w - 1 - cols) if flip else cols  # view column j shows pre-flip column w-1-j
        src_rows, src_cols = rows - dy, view_cols - dx
        inside = (src_rows >= 0) & (src_rows < h) & (src_cols >= 0) & (src_cols < w)
        sources.append(torch.where(inside, src_rows * w + src_cols, -1).reshape(-1))
        views.append(shifted.flip(-1) if flip else shifted)
    return torch.cat(views), torch.stack(sources)


@torch.no_grad()
def tta_denoise(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    patch_size: int,
    num_views: int = 10,
    max_shift_fraction: float = 0.15,
    flip: bool = True,
    fill_value: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time-augmentation denoised teacher features.

    Args:
        teacher: maps ``(N, C, H, W)`` images to raster patch features ``(N, h * w, D)``.
        images: ``(B, C, H, W)``.
        patch_size: teacher patch size (shifts are whole patches).
        num_views: views per image, the first unshifted and unflipped.
        max_shift_fraction: largest shift as a fraction of the grid side (PH-Reg: 0.15).
        flip: flip each view but the first with probability 0.5.
        fill_value: value of uncovered pixels (PH-Reg: the normalised value of white), scalar or per channel.
        generator: RNG for offsets and flips.

    Returns:
        ``(denoised (B, h * w, D), coverage (h * w,))``: the per-position mean over covering views and the number
        of views covering each position (>= 1: the first view covers everything).
    """
    B, _, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    max_shift = round(max_shift_fraction * min(h, w))
    offsets = sample_view_offsets(num_views, max_shift, generator)
    flips = torch.rand(num_views, generator=generator) < 0.5 if flip else torch.zeros(num_views, dtype=torch.bool)
    flips[0] = False
    views, source_index = shift_flip_views(images, offsets, flips, patch_size, fill_value)
    features = teacher(views)  # (V * B, h * w, D)
    if features.shape[:2] != (num_views * B, h * w):
        raise ValueError(f"teacher must return (N, h*w={h * w}, D) raster features, got {tuple(features.shape)}")
    features = features.float().reshape(num_views, B, h * w, -1)
    total = features.new_zeros(B, h * w, features.shape[-1])
    coverage = features.new_zeros(h * w)
    for view, source in enumerate(source_index):
        valid = source >= 0
        total.index_add_(1, source[valid], features[view][:, valid])
        coverage.index_add_(0, source[valid], torch.ones_like(source[valid], dtype=coverage.dtype))
    return total / coverage[:, None], coverage


def dense_patch_features(model: VisionTransformerModel, images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> raster patch tokens ``(B, h * w, D)`` of a :class:`VisionTransformerModel` (no merge)."""
    if model.config.spatial_merge_size != 1:
        raise ValueError("dense_patch_features needs spatial_merge_size=1 (raster token order)")
    tokens = model(images).patch_tokens
    return tokens.reshape(images.shape[0], -1, tokens.shape[-1])


def add_register_tokens(
    teacher: VisionTransformerModel, num_new_registers: int, generator: torch.Generator | None = None
) -> VisionTransformerModel:
    """A copy of ``teacher`` with ``num_new_registers`` more register tokens, initialised ``randn / sqrt(D)``."""
    if num_new_registers < 1:
        raise ValueError(f"num_new_registers must be >= 1, got {num_new_registers}")
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}  # drop diffusers bookkeeping
    old = config["num_register_tokens"]
    config["num_register_tokens"] = old + num_new_registers
    student = VisionTransformerModel.from_config(config).to(teacher.dtype)
    state = teacher.state_dict()
    new = torch.randn(num_new_registers, teacher.dim, generator=generator) / teacher.dim**0.5
    state["register_tokens"] = torch.cat([state["register_tokens"], new.to(teacher.dtype)]) if old else new
    student.load_state_dict(state, strict=True)
    return student


def unlock_ph_reg_parameters(
    student: VisionTransformerModel, parts: tuple[str, ...] | list[str] = PH_REG_PARTS
) -> list[str]:
    """Freeze ``student`` except the PH-Reg parts; returns the names of the trainable parameters.

    ``parts`` picks from ``"registers"``, ``"pos_embed"`` (skipped for RoPE models, which have none),
    ``"patch_embed"`` and ``"last_block"``.
    """
    unknown = sorted(set(parts) - set(PH_REG_PARTS))
    if unknown:
        raise ValueError(f"unknown PH-Reg parts {unknown}; choose from {list(PH_REG_PARTS)}")
    last = f"blocks.{student.config.num_layers - 1}."
    prefixes = {
        "registers": ("register_tokens",),
        "pos_embed": ("pos_embed",),
        "patch_embed": ("patch_embed.",),
        "last_block": (last,),
    }
    allowed = tuple(p for part in parts for p in prefixes[part])
    trainable = []
    for name, param in student.named_parameters():
        param.requires_grad_(name.startswith(allowed))
        if param.requires_grad:
            trainable.append(name)
    if "registers" in parts and "register_tokens" not in trainable:
        raise ValueError("the student has no register tokens; build it with add_register_tokens first")
    return trainable


def ph_reg_loss(student: torch.Tensor, target: torch.Tensor, mse_weight: float = 1.0) -> torch.Tensor:
    """``(1 - mean cos) + mse_weight * MSE`` between ``(..., D)`` student and target patch features."""
    if student.shape != target.shape:
        raise ValueError(f"student {tuple(student.shape)} and target {tuple(target.shape)} features differ in shape")
    cosine = F.cosine_similarity(student.float(), target.float(), dim=-1, eps=1e-8)
    return (1 - cosine.mean()) + mse_weight * F.mse_loss(student.float(), target.float())


def artifact_report(features: torch.Tensor, k: float = 3.0) -> dict[str, torch.Tensor]:
    """Token-norm statistics of ``(B, N, D)`` patch features.

    Returns:
        ``norms (B, N)``, ``ratio (B,)`` = max norm / median norm, ``fraction_above (B,)`` = share of tokens whose
        norm exceeds ``k`` x the image's median.
    """
    norms = features.float().norm(dim=-1)
    median = norms.median(dim=-1, keepdim=True).values
    return {
        "norms": norms,
        "ratio": norms.max(dim=-1).values / median[:, 0],
        "fraction_above": (norms > k * median).float().mean(dim=-1),
    }
