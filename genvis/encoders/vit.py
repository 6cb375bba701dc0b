"""The shared native-resolution Vision Transformer of genvis.

One configurable pre-norm ViT covers the published encoders as configs plus a state-dict converter
(:mod:`genvis.encoders.convert_transformers`):

- input: packed patch vectors ``(N, C * pt * p * p)`` plus ``grid_thw`` (Qwen2-VL convention, built by
  :class:`genvis.encoders.NativeResolutionProcessor`), or a dense ``(B, C, H, W)`` / ``(B, C, T, H, W)`` batch of
  same-size items. Images of different sizes share one sequence; attention is block-diagonal through ``cu_seqlens``
  (per frame, or per clip with ``attend_across_frames``), never a dense N x N mask.
- position: learned absolute grid resized per image (ViT/CLIP/DINOv2 bicubic, SigLIP 2 NaFlex bilinear+antialias),
  2D RoPE (Qwen2-VL, NaViT-style generalisation), or none.
- tokens: optional CLS, ``num_register_tokens`` registers after the CLS without position embedding (Darcet et al.,
  arXiv 2309.16588), a mask token; dense outputs always exclude CLS and registers.
- blocks: LayerNorm or RMSNorm, GELU / tanh-GELU / quick-GELU / SwiGLU MLP, optional LayerScale, window attention in
  all but ``full_attention_layers`` (Qwen2.5-VL, arXiv 2502.13923).
- heads: CLS, mean, MAP (SigLIP 2) or CLS+dense+tanh (ViTModel) pooling, and an ``m x m`` patch merger feeding an LLM.

API follows dinov2 (named outputs) and timm (``forward_features``, ``forward_intermediates``,
``set_grad_checkpointing``). Conformance against ``transformers`` ViT, CLIP, SigLIP 2, DINOv2-with-registers and the
Qwen2-VL / Qwen2.5-VL vision towers: tests/encoders/test_convert_transformers.py; packed-vs-alone equality and padded
layout: tests/encoders/test_vit_model.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from genvis.encoders.packing import patchify_frames, token_coordinates, tokens_to_grids
from genvis.layers import (
    GELUMLP,
    Attention,
    PatchEmbed,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    cu_seqlens_from_lengths,
    pad_packed,
)

__all__ = ["VISION_TRANSFORMER_PRESETS", "VisionTransformerModel", "VisionTransformerOutput"]

MlpType = Literal["gelu", "gelu_tanh", "quick_gelu", "swiglu"]
NormType = Literal["layer", "rms"]


@dataclass
class VisionTransformerOutput(BaseOutput):
    """Named outputs of :class:`VisionTransformerModel`. All token tensors are packed (items back to back).

    Args:
        last_hidden_state: ``(S, D)`` the whole sequence (per attention segment: CLS, registers, patches), after the
            final norm when ``final_norm="all"``.
        patch_tokens: ``(N, D)`` patch tokens only, in packing order (block-major when ``spatial_merge_size > 1``).
        cls_token: ``(num_segments, D)`` or None.
        register_tokens: ``(num_segments, R, D)`` or None.
        pooler_output: ``(num_segments, D)`` pooled vector (CLS / mean / MAP), or None.
        merged_tokens: ``(N / m^2, merger_out_dim)`` merger output, or None.
        intermediates: patch tokens ``(N, D)`` after each requested block, or None.
        grid_thw: ``(num_items, 3)`` patch grid of each item.
        cu_seqlens: ``(num_items + 1,)`` item boundaries in ``patch_tokens``.
        segment_cu_seqlens: ``(num_segments + 1,)`` attention-segment boundaries in ``patch_tokens`` (one segment
            per frame, or per item with ``attend_across_frames``).
    """

    last_hidden_state: torch.Tensor = None
    patch_tokens: torch.Tensor = None
    cls_token: torch.Tensor | None = None
    register_tokens: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    merged_tokens: torch.Tensor | None = None
    intermediates: tuple[torch.Tensor, ...] | None = None
    grid_thw: torch.Tensor = None
    cu_seqlens: torch.Tensor = None
    segment_cu_seqlens: torch.Tensor = None


def _make_norm(norm_type: NormType, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps=eps) if norm_type == "rms" else nn.LayerNorm(dim, eps=eps)


def _make_mlp(mlp_type: MlpType, dim: int, hidden_dim: int, bias: bool) -> nn.Module:
    if mlp_type == "swiglu":
        return SwiGLU(dim, hidden_dim, bias=bias)
    approximate = {"gelu": "none", "gelu_tanh": "tanh", "quick_gelu": "quick"}[mlp_type]
    return GELUMLP(dim, hidden_dim, approximate=approximate, bias=bias)


@dataclass
class _SequenceLayout:
    """Where every token of the packed sequence comes from (computed once per forward from ``grid_thw``)."""

    coords: torch.Tensor  # (N, 3) (t, h, w) of each patch token, packing order
    segment_lengths: list[int]  # patch tokens per attention segment
    segment_ids: torch.Tensor  # (N,) segment of each patch token
    num_special: int  # CLS + registers per segment
    cu_seqlens: torch.Tensor  # (num_segments + 1,) over the full sequence
    patch_positions: torch.Tensor  # (N,) index of each patch token in the full sequence
    special_positions: torch.Tensor  # (num_segments, num_special)
    gather_index: torch.Tensor | None  # (S,) full sequence <- cat([patches, specials]); None when no specials
    window_perm: torch.Tensor | None = None  # (S,) window order <- packing order
    window_cu_seqlens: torch.Tensor | None = None


class VisionTransformerBlock(nn.Module):
    """Pre-norm ViT block with optional LayerScale.

    Args:
        dim: token width.
        num_heads: attention heads.
        head_dim: width per head.
        mlp_hidden_dim: MLP inner width.
        mlp_type: MLP activation family.
        mlp_bias: biases in the MLP.
        qkv_bias: biases on q/k/v.
        norm_type: LayerNorm or RMSNorm.
        norm_eps: norm epsilon.
        layer_scale_init_value: LayerScale init (DINOv2), None for no LayerScale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden_dim: int,
        mlp_type: MlpType,
        mlp_bias: bool,
        qkv_bias: bool,
        norm_type: NormType,
        norm_eps: float,
        layer_scale_init_value: float | None,
    ) -> None:
        super().__init__()
        self.norm1 = _make_norm(norm_type, dim, norm_eps)
        self.attn = Attention(dim, num_heads, head_dim=head_dim, bias=qkv_bias, out_bias=True)
        self.norm2 = _make_norm(norm_type, dim, norm_eps)
        self.mlp = _make_mlp(mlp_type, dim, mlp_hidden_dim, mlp_bias)
        if layer_scale_init_value is None:
            self.layer_scale1 = self.layer_scale2 = None
        else:
            self.layer_scale1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.layer_scale2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states``: packed ``(S, D)`` with ``cu_seqlens``, or ``(B, L, D)`` with an optional key mask."""
        attn_out = self.attn(
            self.norm1(hidden_states), rotary_emb=rotary_emb, cu_seqlens=cu_seqlens, attn_mask=attn_mask
        )
        if self.layer_scale1 is not None:
            attn_out = attn_out * self.layer_scale1
        hidden_states = hidden_states + attn_out
        mlp_out = self.mlp(self.norm2(hidden_states))
        if self.layer_scale2 is not None:
            mlp_out = mlp_out * self.layer_scale2
        return hidden_states + mlp_out


class VisionTransformerMAPHead(nn.Module):
    """Multi-head attention pooling (SigLIP): a learned probe attends over each segment's patch tokens.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_hidden_dim: MLP inner width.
        mlp_type: MLP activation family.
        norm_type: LayerNorm or RMSNorm.
        norm_eps: norm epsilon.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden_dim: int, mlp_type: MlpType, norm_type: NormType, norm_eps: float
    ) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, dim))
        self.attn = Attention(dim, num_heads, bias=True, out_bias=True, cross_attention_dim=dim)
        self.norm = _make_norm(norm_type, dim, norm_eps)
        self.mlp = _make_mlp(mlp_type, dim, mlp_hidden_dim, True)

    def forward(self, patch_tokens: torch.Tensor, segment_cu_seqlens: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` packed tokens -> ``(num_segments, D)``."""
        num_segments = segment_cu_seqlens.numel() - 1
        probes = self.probe.expand(num_segments, -1)  # (num_segments, D), one query per segment
        query_cu = torch.arange(num_segments + 1, dtype=torch.int32, device=patch_tokens.device)
        pooled = self.attn(probes, patch_tokens, cu_seqlens=query_cu, encoder_cu_seqlens=segment_cu_seqlens)
        return pooled + self.mlp(self.norm(pooled))


class VisionTransformerPatchMerger(nn.Module):
    """Qwen2-VL patch merger: norm each token, concatenate ``m x m`` neighbours, MLP to the LLM width.

    Args:
        dim: token width.
        out_dim: output width (the LLM hidden size).
        merge_size: merge window side ``m``.
        hidden_dim: MLP inner width (Qwen: ``dim * m^2``).
        norm_type: LayerNorm or RMSNorm.
        norm_eps: norm epsilon.
    """

    def __init__(
        self, dim: int, out_dim: int, merge_size: int, hidden_dim: int, norm_type: NormType, norm_eps: float
    ) -> None:
        super().__init__()
        self.merge_units = merge_size * merge_size
        self.norm = _make_norm(norm_type, dim, norm_eps)
        self.fc1 = nn.Linear(dim * self.merge_units, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` block-major tokens -> ``(N / m^2, out_dim)``."""
        merged = self.norm(patch_tokens).reshape(-1, patch_tokens.shape[-1] * self.merge_units)  # (N/m^2, m^2 D)
        return self.fc2(F.gelu(self.fc1(merged)))


class VisionTransformerModel(ModelMixin, ConfigMixin):
    """Native-resolution ViT with packing, registers, learned/RoPE positions, pooling heads and a patch merger.

    Args:
        in_channels: image channels.
        patch_size: spatial patch side.
        temporal_patch_size: frames per patch (Qwen2-VL: 2; images are repeated by the processor).
        patch_bias: bias on the patch projection (CLIP and Qwen have none).
        num_layers: transformer blocks.
        num_attention_heads: attention heads.
        attention_head_dim: width per head; the token width is ``num_attention_heads * attention_head_dim``.
        mlp_hidden_dim: MLP inner width.
        mlp_type: ``"gelu"``, ``"gelu_tanh"``, ``"quick_gelu"`` or ``"swiglu"``.
        mlp_bias: biases in the MLPs.
        qkv_bias: biases on q/k/v.
        norm_type: ``"layer"`` or ``"rms"``.
        norm_eps: norm epsilon.
        layer_scale_init_value: LayerScale init value, None disables LayerScale.
        position_embedding_type: ``"learned"`` (absolute grid, resized per image), ``"rope"`` (2D RoPE) or ``"none"``.
        pos_embed_grid_size: ``[h, w]`` of the learned grid.
        pos_embed_cls: the learned table has a leading CLS row (ViT/CLIP/DINOv2).
        pos_embed_interpolation: ``"bicubic"`` or ``"bilinear"`` resizing of the learned grid.
        pos_embed_antialias: antialiased resizing (DINOv2-reg, SigLIP 2).
        rope_theta: RoPE base.
        use_cls_token: prepend a CLS token to every attention segment.
        num_register_tokens: registers placed after the CLS, without position embedding.
        use_mask_token: learn a mask token substituted for masked patches (``patch_mask``).
        pre_norm: norm after the embeddings (CLIP's ``pre_layrnorm``).
        final_norm: apply the final norm to ``"all"`` tokens, only to the ``"pooled"`` CLS (CLIP), or ``"none"``.
        pooling_type: ``"cls"``, ``"mean"``, ``"map"``, ``"cls_dense_tanh"`` (ViTModel pooler) or ``"none"``.
        spatial_merge_size: merge window side ``m``; tokens are block-major when ``m > 1``.
        merger_out_dim: output width of the patch merger, None for no merger.
        merger_hidden_dim: merger inner width, default ``D * m^2``.
        window_size: window side in patches for window attention (Qwen2.5-VL), None for full attention everywhere.
        full_attention_layers: block indices that keep full attention when ``window_size`` is set.
        attend_across_frames: one attention segment per clip instead of per frame (Qwen attends per frame).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 16,
        temporal_patch_size: int = 1,
        patch_bias: bool = True,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        mlp_hidden_dim: int = 3072,
        mlp_type: MlpType = "gelu",
        mlp_bias: bool = True,
        qkv_bias: bool = True,
        norm_type: NormType = "layer",
        norm_eps: float = 1e-6,
        layer_scale_init_value: float | None = None,
        position_embedding_type: Literal["learned", "rope", "none"] = "rope",
        pos_embed_grid_size: list[int] | None = None,
        pos_embed_cls: bool = False,
        pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic",
        pos_embed_antialias: bool = False,
        rope_theta: float = 10000.0,
        use_cls_token: bool = True,
        num_register_tokens: int = 0,
        use_mask_token: bool = False,
        pre_norm: bool = False,
        final_norm: Literal["all", "pooled", "none"] = "all",
        pooling_type: Literal["cls", "mean", "map", "cls_dense_tanh", "none"] = "cls",
        spatial_merge_size: int = 1,
        merger_out_dim: int | None = None,
        merger_hidden_dim: int | None = None,
        window_size: int | None = None,
        full_attention_layers: list[int] | None = None,
        attend_across_frames: bool = False,
    ) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self._validate_config(dim)
        self.dim = dim
        self.num_special_tokens = int(use_cls_token) + num_register_tokens
        self.gradient_checkpointing = False

        # 1. embeddings: the patch projection is a conv kernel applied to flattened (C, pt, ph, pw) patch vectors
        patch = [patch_size, patch_size] if temporal_patch_size == 1 else [temporal_patch_size, patch_size, patch_size]
        self.patch_embed = PatchEmbed(in_channels, dim, patch, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, dim)) if use_cls_token else None
        self.register_tokens = nn.Parameter(torch.zeros(num_register_tokens, dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(dim)) if use_mask_token else None
        if position_embedding_type == "learned":
            grid_h, grid_w = pos_embed_grid_size
            self.pos_embed = nn.Parameter(torch.zeros(grid_h * grid_w + int(pos_embed_cls), dim))
        else:
            self.pos_embed = None
        self.rope = (
            RotaryEmbedding(attention_head_dim, [attention_head_dim // 2] * 2, theta=rope_theta)
            if position_embedding_type == "rope"
            else None
        )
        self.norm_pre = _make_norm(norm_type, dim, norm_eps) if pre_norm else None

        # 2. blocks
        self.blocks = nn.ModuleList(
            [
                VisionTransformerBlock(
                    dim,
                    num_attention_heads,
                    attention_head_dim,
                    mlp_hidden_dim,
                    mlp_type,
                    mlp_bias,
                    qkv_bias,
                    norm_type,
                    norm_eps,
                    layer_scale_init_value,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = _make_norm(norm_type, dim, norm_eps) if final_norm != "none" else None

        # 3. heads
        self.map_head = (
            VisionTransformerMAPHead(dim, num_attention_heads, mlp_hidden_dim, mlp_type, norm_type, norm_eps)
            if pooling_type == "map"
            else None
        )
        self.pooler_dense = nn.Linear(dim, dim) if pooling_type == "cls_dense_tanh" else None
        self.merger = (
            VisionTransformerPatchMerger(
                dim,
                merger_out_dim,
                spatial_merge_size,
                merger_hidden_dim or dim * spatial_merge_size**2,
                norm_type,
                norm_eps,
            )
            if merger_out_dim is not None
            else None
        )
        self.initialize_weights()

    def _validate_config(self, dim: int) -> None:
        config = self.config
        choices = {
            "mlp_type": ("gelu", "gelu_tanh", "quick_gelu", "swiglu"),
            "norm_type": ("layer", "rms"),
            "position_embedding_type": ("learned", "rope", "none"),
            "pos_embed_interpolation": ("bicubic", "bilinear"),
            "final_norm": ("all", "pooled", "none"),
            "pooling_type": ("cls", "mean", "map", "cls_dense_tanh", "none"),
        }
        for field, allowed in choices.items():
            if config[field] not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {config[field]!r}")
        positive = ("in_channels", "patch_size", "temporal_patch_size", "num_attention_heads", "attention_head_dim")
        for field in (*positive, "mlp_hidden_dim", "spatial_merge_size"):
            if int(config[field]) < 1:
                raise ValueError(f"{field} must be >= 1, got {config[field]}")
        if config.num_layers < 0 or config.num_register_tokens < 0:
            raise ValueError(
                f"num_layers and num_register_tokens must be >= 0, got {config.num_layers}, {config.num_register_tokens}"
            )
        if config.position_embedding_type == "rope" and config.attention_head_dim % 4:
            raise ValueError(f"2D RoPE needs attention_head_dim divisible by 4, got {config.attention_head_dim}")
        if config.position_embedding_type == "learned":
            grid = config.pos_embed_grid_size
            if grid is None or len(grid) != 2 or min(grid) < 1:
                raise ValueError(f"pos_embed_grid_size must be [h, w] for learned positions, got {grid}")
        if config.pooling_type in ("cls", "cls_dense_tanh") and not config.use_cls_token:
            raise ValueError(f"pooling_type={config.pooling_type!r} needs use_cls_token=True")
        if config.final_norm == "pooled" and config.pooling_type != "cls":
            raise ValueError(
                f"final_norm='pooled' normalises the CLS only; needs pooling_type='cls', got {config.pooling_type!r}"
            )
        if config.window_size is not None:
            if config.window_size % config.spatial_merge_size:
                raise ValueError(
                    f"window_size ({config.window_size}) must be a multiple of spatial_merge_size "
                    f"({config.spatial_merge_size})"
                )
            if config.use_cls_token or config.num_register_tokens:
                raise ValueError("window attention is not defined with CLS/register tokens; disable them")
        for index in config.full_attention_layers or []:
            if not 0 <= index < config.num_layers:
                raise ValueError(f"full_attention_layers entry {index} is outside [0, num_layers={config.num_layers})")

    def initialize_weights(self) -> None:
        """All init in one place: truncated-normal(0.02) linears and tokens, zero biases, unit norms.

        Registers follow DINOv2's small init so a model gaining registers starts close to the one without; LayerScale
        keeps its configured init value.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for token in (self.cls_token, self.pos_embed, self.mask_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.map_head is not None:
            nn.init.trunc_normal_(self.map_head.probe, std=0.02)

    # ------------------------------------------------------------------------------------------------- inputs
    @property
    def patch_dim(self) -> int:
        return self.patch_embed.patch_dim

    def _dense_to_packed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` or ``(B, C, T, H, W)`` -> packed patches and ``grid_thw``."""
        config = self.config
        if pixel_values.shape[1] != config.in_channels:
            raise ValueError(
                f"pixel_values must have in_channels={config.in_channels} channels at dim 1, got "
                f"{pixel_values.shape[1]} (shape {tuple(pixel_values.shape)})"
            )
        height, width = pixel_values.shape[-2:]
        if height < config.patch_size or width < config.patch_size:
            raise ValueError(
                f"image of {height}x{width} pixels is smaller than one {config.patch_size}x{config.patch_size} patch"
            )
        frames = pixel_values[:, :, None] if pixel_values.ndim == 4 else pixel_values
        frames = frames.transpose(1, 2)  # (B, T, C, H, W)
        patches, grids = [], []
        for clip in frames:
            item, grid = patchify_frames(
                clip, config.patch_size, config.temporal_patch_size, config.spatial_merge_size
            )
            patches.append(item)
            grids.append(grid)
        return torch.cat(patches), torch.tensor(grids, dtype=torch.long, device=pixel_values.device)

    def _check_packed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None) -> torch.Tensor:
        if grid_thw is None:
            raise ValueError("packed pixel_values (N, patch_dim) need grid_thw (num_items, 3)")
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long, device=pixel_values.device)
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise ValueError(f"grid_thw must be (num_items, 3), got shape {tuple(grid_thw.shape)}")
        if (grid_thw <= 0).any():
            raise ValueError(f"grid_thw entries must be positive, got {grid_thw.tolist()}")
        if pixel_values.shape[-1] != self.patch_dim:
            raise ValueError(
                f"pixel_values rows must have C*pt*p*p = {self.patch_dim} values (in_channels={self.config.in_channels},"
                f" temporal_patch_size={self.config.temporal_patch_size}, patch_size={self.config.patch_size}), got "
                f"{pixel_values.shape[-1]}"
            )
        total = int(grid_thw.prod(-1).sum())
        if total != pixel_values.shape[0]:
            raise ValueError(f"grid_thw covers {total} patches but pixel_values has {pixel_values.shape[0]} rows")
        merge = self.config.spatial_merge_size
        if merge > 1 and ((grid_thw[:, 1:] % merge) != 0).any():
            raise ValueError(f"grid h and w must be multiples of spatial_merge_size={merge}, got {grid_thw.tolist()}")
        return grid_thw

    def _sequence_layout(self, grid_thw: torch.Tensor) -> _SequenceLayout:
        config, device = self.config, grid_thw.device
        coords = token_coordinates(grid_thw, config.spatial_merge_size)
        segment_lengths = []
        for t, h, w in grid_thw.tolist():
            segment_lengths += [t * h * w] if config.attend_across_frames else [h * w] * t
        num_segments, num_special = len(segment_lengths), self.num_special_tokens
        lengths = torch.tensor(segment_lengths, device=device)
        segment_ids = torch.repeat_interleave(torch.arange(num_segments, device=device), lengths)
        full_lengths = lengths + num_special
        starts = torch.cumsum(full_lengths, 0) - full_lengths  # start of each segment in the full sequence
        segment_offsets = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(len(segment_ids), device=device) - segment_offsets[segment_ids]  # index inside segment
        patch_positions = starts[segment_ids] + num_special + within
        special_positions = starts[:, None] + torch.arange(num_special, device=device)  # (num_segments, K)
        gather_index = None
        if num_special:
            total = int(full_lengths.sum())
            gather_index = torch.empty(total, dtype=torch.long, device=device)
            gather_index[patch_positions] = torch.arange(len(patch_positions), device=device)
            gather_index[special_positions.flatten()] = len(patch_positions) + torch.arange(
                special_positions.numel(), device=device
            )
        layout = _SequenceLayout(
            coords=coords,
            segment_lengths=segment_lengths,
            segment_ids=segment_ids,
            num_special=num_special,
            cu_seqlens=cu_seqlens_from_lengths(full_lengths, device=device),
            patch_positions=patch_positions,
            special_positions=special_positions,
            gather_index=gather_index,
        )
        if config.window_size is not None:
            # windows tile each frame row-major; stable sort keeps the packing order inside a window (Qwen2.5-VL)
            window = config.window_size
            cols = int((grid_thw[:, 2].max() + window - 1) // window)
            rows = int((grid_thw[:, 1].max() + window - 1) // window)
            window_id = (coords[:, 1] // window) * cols + coords[:, 2] // window
            frames = int(grid_thw[:, 0].max())
            key = (segment_ids * frames + coords[:, 0]) * (rows * cols) + window_id  # (segment, frame, window)
            layout.window_perm = torch.sort(key, stable=True).indices
            counts = torch.unique_consecutive(key[layout.window_perm], return_counts=True)[1]
            layout.window_cu_seqlens = cu_seqlens_from_lengths(counts, device=device)
        return layout

    # ------------------------------------------------------------------------------------------------- embeddings
    def _resized_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Learned patch position grid resized to ``height x width`` patches, ``(height * width, D)`` raster."""
        config = self.config
        table = self.pos_embed[int(config.pos_embed_cls) :]
        grid_h, grid_w = config.pos_embed_grid_size
        if (height, width) == (grid_h, grid_w):
            return table
        grid = table.reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        resized = F.interpolate(
            grid.float(),
            size=(height, width),
            mode=config.pos_embed_interpolation,
            align_corners=False,
            antialias=config.pos_embed_antialias,
        ).to(table.dtype)
        return resized.permute(0, 2, 3, 1).reshape(height * width, -1)  # (h*w, D)

    def _embed(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        layout: _SequenceLayout,
        patch_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Patch + position embeddings and special tokens -> full packed sequence ``(S, D)`` and RoPE tables."""
        config = self.config
        patches = self.patch_embed.forward_patches(pixel_values.to(self.patch_embed.proj.weight.dtype))  # (N, D)
        if patch_mask is not None:
            if self.mask_token is None:
                raise ValueError("patch_mask needs a model built with use_mask_token=True")
            if patch_mask.shape != patches.shape[:1]:
                raise ValueError(
                    f"patch_mask must be ({patches.shape[0]},) bools, got shape {tuple(patch_mask.shape)}"
                )
            patches = torch.where(patch_mask[:, None], self.mask_token.to(patches.dtype), patches)

        if self.pos_embed is not None:
            tables: dict[tuple[int, int], torch.Tensor] = {}
            pos = []
            for (_t, h, w), item_coords in zip(grid_thw.tolist(), layout.coords.split(grid_thw.prod(-1).tolist())):
                if (h, w) not in tables:
                    tables[(h, w)] = self._resized_pos_embed(h, w)
                pos.append(tables[(h, w)][item_coords[:, 1] * w + item_coords[:, 2]])
            patches = patches + torch.cat(pos)

        rotary = None
        if self.rope is not None:
            cos, sin = self.rope(layout.coords[:, 1:])  # (N, head_dim) from (h, w) patch positions
            if layout.gather_index is not None:  # special tokens are not rotated: cos 1, sin 0
                num = layout.special_positions.numel()
                cos = torch.cat([cos, cos.new_ones(num, cos.shape[-1])])[layout.gather_index]
                sin = torch.cat([sin, sin.new_zeros(num, sin.shape[-1])])[layout.gather_index]
            rotary = (cos, sin)

        if layout.gather_index is None:
            return patches, rotary
        num_segments = len(layout.segment_lengths)
        special = []
        if self.cls_token is not None:
            cls = self.cls_token
            if self.pos_embed is not None and config.pos_embed_cls:
                cls = cls + self.pos_embed[:1]
            special.append(cls.expand(num_segments, 1, -1))
        if self.register_tokens is not None:
            special.append(self.register_tokens.expand(num_segments, -1, -1))
        special = torch.cat(special, dim=1).to(patches.dtype).reshape(-1, patches.shape[-1])  # (num_segments*K, D)
        return torch.cat([patches, special])[layout.gather_index], rotary

    # ------------------------------------------------------------------------------------------------- encoder
    def _encode(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor | None,
        patch_mask: torch.Tensor | None,
        collect: set[int],
        attention_layout: Literal["packed", "padded"],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor, _SequenceLayout]:
        config = self.config
        if attention_layout not in ("packed", "padded"):
            raise ValueError(f"attention_layout must be 'packed' or 'padded', got {attention_layout!r}")
        if pixel_values.ndim in (4, 5):
            if grid_thw is not None:
                raise ValueError("grid_thw is only for packed (N, patch_dim) pixel_values, not a dense batch")
            pixel_values, grid_thw = self._dense_to_packed(pixel_values)
        elif pixel_values.ndim == 2:
            grid_thw = self._check_packed(pixel_values, grid_thw)
        else:
            raise ValueError(
                f"pixel_values must be packed (N, patch_dim) or dense (B, C, H, W) / (B, C, T, H, W), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        layout = self._sequence_layout(grid_thw)
        hidden_states, rotary = self._embed(pixel_values, grid_thw, layout, patch_mask)
        if self.norm_pre is not None:
            hidden_states = self.norm_pre(hidden_states)
        compression = self.__dict__.get("token_compression")
        if (
            compression is not None
        ):  # token merging/pruning runs the blocks itself (per image, see set_token_compression)
            if attention_layout != "packed" or layout.window_perm is not None:
                raise ValueError("token compression needs attention_layout='packed' and no window attention")
            hidden_states, intermediates = compression(self, hidden_states, rotary, layout, collect)
            return hidden_states, intermediates, grid_thw, layout

        # Execution layout: packed with cu_seqlens (optionally window-permuted), a plain batch when every segment
        # has the same length (one SDPA call, no mask), or a padded batch with a key mask.
        lengths = [n + layout.num_special for n in layout.segment_lengths]
        full_kwargs: dict = {"cu_seqlens": layout.cu_seqlens}
        window_kwargs = full_kwargs
        if attention_layout == "padded":
            if layout.window_perm is not None:
                raise ValueError("attention_layout='padded' does not support window attention; use 'packed'")
            hidden_states, key_mask = pad_packed(hidden_states, layout.cu_seqlens)
            if rotary is not None:
                rotary = tuple(pad_packed(table, layout.cu_seqlens)[0] for table in rotary)
            full_kwargs = window_kwargs = {"attn_mask": key_mask}

            def to_packed(states):
                return states[key_mask]

        elif layout.window_perm is None and len(set(lengths)) == 1:
            batch_shape = (len(lengths), lengths[0])
            hidden_states = hidden_states.reshape(*batch_shape, -1)  # (num_segments, L, D)
            if rotary is not None:
                rotary = tuple(table.reshape(*batch_shape, -1) for table in rotary)
            full_kwargs = window_kwargs = {}

            def to_packed(states):
                return states.reshape(-1, states.shape[-1])

        elif layout.window_perm is not None:
            perm = layout.window_perm
            hidden_states = hidden_states[perm]
            if rotary is not None:
                rotary = tuple(table[perm] for table in rotary)
            window_kwargs = {"cu_seqlens": layout.window_cu_seqlens}
            inverse = torch.argsort(perm)

            def to_packed(states):
                return states[inverse]

        else:

            def to_packed(states):
                return states

        full_layers = set(config.full_attention_layers or [])
        intermediates: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            kwargs = full_kwargs if config.window_size is None or index in full_layers else window_kwargs
            args = (hidden_states, rotary, kwargs.get("cu_seqlens"), kwargs.get("attn_mask"))
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                hidden_states = block(*args)
            if index in collect:
                intermediates[index] = to_packed(hidden_states)
        return to_packed(hidden_states), intermediates, grid_thw, layout

    def _resolve_indices(self, indices: int | list[int] | None) -> list[int]:
        num_layers = self.config.num_layers
        if indices is None:
            return []
        if isinstance(indices, int):
            if not 0 < indices <= num_layers:
                raise ValueError(f"indices as a count must be in [1, num_layers={num_layers}], got {indices}")
            return list(range(num_layers - indices, num_layers))
        resolved = [i + num_layers if i < 0 else i for i in indices]
        for original, index in zip(indices, resolved):
            if not 0 <= index < num_layers:
                raise ValueError(f"block index {original} is outside [-{num_layers}, {num_layers})")
        return resolved

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor | None = None,
        *,
        patch_mask: torch.Tensor | None = None,
        intermediate_layers: int | list[int] | None = None,
        attention_layout: Literal["packed", "padded"] = "packed",
    ) -> VisionTransformerOutput:
        """Embeddings, blocks and final norm, split into named token groups (no pooling head, no merger).

        Args:
            pixel_values: packed ``(N, C * pt * p * p)`` patch vectors with ``grid_thw``, or a dense
                ``(B, C, H, W)`` / ``(B, C, T, H, W)`` batch.
            grid_thw: ``(num_items, 3)`` patch grid per item for packed input.
            patch_mask: ``(N,)`` bools, True replaces the patch by the mask token.
            intermediate_layers: block indices (negative from the end) or a count of last blocks whose patch tokens
                are returned in ``intermediates`` (before the final norm, registers/CLS stripped).
            attention_layout: ``"packed"`` (block-diagonal via ``cu_seqlens``) or ``"padded"`` (a padded batch with a
                key mask; same outputs, for comparison).
        """
        indices = self._resolve_indices(intermediate_layers)
        hidden_states, collected, grid_thw, layout = self._encode(
            pixel_values, grid_thw, patch_mask, set(indices), attention_layout
        )
        if self.norm is not None and self.config.final_norm == "all":
            hidden_states = self.norm(hidden_states)
        cls_token = register_tokens = None
        if self.num_special_tokens:
            special = hidden_states[layout.special_positions]  # (num_segments, K, D)
            if self.cls_token is not None:
                cls_token, special = special[:, 0], special[:, 1:]
            if self.register_tokens is not None:
                register_tokens = special
        patch_positions = layout.patch_positions
        return VisionTransformerOutput(
            last_hidden_state=hidden_states,
            patch_tokens=hidden_states[patch_positions],
            cls_token=cls_token,
            register_tokens=register_tokens,
            intermediates=tuple(collected[i][patch_positions] for i in indices) if indices else None,
            grid_thw=grid_thw,
            cu_seqlens=cu_seqlens_from_lengths(grid_thw.prod(-1), device=grid_thw.device),
            segment_cu_seqlens=cu_seqlens_from_lengths(layout.segment_lengths, device=grid_thw.device),
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor | None = None,
        *,
        patch_mask: torch.Tensor | None = None,
        intermediate_layers: int | list[int] | None = None,
        attention_layout: Literal["packed", "padded"] = "packed",
        return_dict: bool = True,
    ) -> VisionTransformerOutput | tuple:
        """Encode a packed or dense batch; see :meth:`forward_features` for the arguments.

        Returns:
            :class:`VisionTransformerOutput` with ``pooler_output`` and ``merged_tokens`` filled in when configured,
            or its fields as a tuple when ``return_dict=False``.
        """
        output = self.forward_features(
            pixel_values,
            grid_thw,
            patch_mask=patch_mask,
            intermediate_layers=intermediate_layers,
            attention_layout=attention_layout,
        )
        pooling = self.config.pooling_type
        if pooling == "cls":
            output.pooler_output = (
                self.norm(output.cls_token) if self.config.final_norm == "pooled" else output.cls_token
            )
        elif pooling == "cls_dense_tanh":
            output.pooler_output = torch.tanh(self.pooler_dense(output.cls_token))
        elif pooling == "mean":
            segment_lengths = output.segment_cu_seqlens.diff().tolist()
            output.pooler_output = torch.stack([seg.mean(0) for seg in output.patch_tokens.split(segment_lengths)])
        elif pooling == "map":
            output.pooler_output = self.map_head(output.patch_tokens, output.segment_cu_seqlens)
        if self.merger is not None:
            output.merged_tokens = self.merger(output.patch_tokens)
        return output if return_dict else output.to_tuple()

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor | None = None,
        *,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: Literal["packed", "grid"] = "packed",
        intermediates_only: bool = False,
    ) -> list | tuple[VisionTransformerOutput, list]:
        """timm-style intermediate features (registers and CLS stripped).

        Args:
            pixel_values: as in :meth:`forward_features`.
            grid_thw: as in :meth:`forward_features`.
            indices: block indices, or a count of last blocks (default: all blocks).
            norm: apply the final norm to each intermediate.
            output_fmt: ``"packed"`` ``(N, D)`` tensors, or ``"grid"``: per item a raster ``(t, h, w, D)`` map.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt not in ("packed", "grid"):
            raise ValueError(f"output_fmt must be 'packed' or 'grid', got {output_fmt!r}")
        output = self.forward(
            pixel_values, grid_thw, intermediate_layers=indices if indices is not None else self.config.num_layers
        )
        features = list(output.intermediates)
        if norm and self.norm is not None:
            features = [self.norm(feature) for feature in features]
        if output_fmt == "grid":
            features = [tokens_to_grids(f, output.grid_thw, self.config.spatial_merge_size) for f in features]
        return features if intermediates_only else (output, features)

    def set_token_compression(self, compressor: nn.Module | None) -> None:
        """Run the blocks through a token merging/pruning ``compressor`` (None restores the plain encoder).

        The compressor (:mod:`genvis.encoders.token_compression`) is called as
        ``compressor(model, hidden_states, rotary, layout, collect) -> (hidden_states, intermediates)`` and must return
        the full-length packed sequence (reduced tokens un-merged back to their positions), so every output keeps its
        shape. It is stored outside ``_modules``: the encoder's state dict, ``parameters()`` and ``save_pretrained``
        are unchanged; move it to the device yourself.
        """
        if compressor is not None and not callable(compressor):
            raise ValueError(f"compressor must be callable or None, got {type(compressor).__name__}")
        self.__dict__["token_compression"] = compressor

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm alias of ``enable_gradient_checkpointing`` / ``disable_gradient_checkpointing``."""
        if enable:
            self.enable_gradient_checkpointing()
        else:
            self.disable_gradient_checkpointing()

    def patch_grids(self, output: VisionTransformerOutput, tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Dense maps: ``tokens`` (default the output's patch tokens) as one raster ``(t, h, w, D)`` per item."""
        tokens = output.patch_tokens if tokens is None else tokens
        return tokens_to_grids(tokens, output.grid_thw, self.config.spatial_merge_size)


# Size presets (timm / DINOv2 widths). "tiny" is the CI size.
VISION_TRANSFORMER_PRESETS: dict[str, dict] = {
    "tiny": {
        "patch_size": 8,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "mlp_hidden_dim": 64,
        "num_register_tokens": 2,
    },
    "S": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64, "mlp_hidden_dim": 1536},
    "B": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64, "mlp_hidden_dim": 3072},
    "L": {"num_layers": 24, "num_attention_heads": 16, "attention_head_dim": 64, "mlp_hidden_dim": 4096},
}
