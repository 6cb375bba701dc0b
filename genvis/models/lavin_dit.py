"""LaVin-DiT's Joint Diffusion Transformer (J-DiT): in-context generation over ST-VAE latents.

Paper: "LaVin-DiT: Large Vision Diffusion Transformer", arXiv 2411.11505 (CVPR 2025). Structure follows the official
inference code (``DerrickWang005/LaVin-DiT``, ``lib/model/{dit,blocks}.py``) where it and the paper differ
(see /work/shared/specs/lavin_dit_mvdit.md §1.2-1.5, §1.10):

- two token streams with separate weights: the *condition* stream (clean latents of the context pairs and the query,
  frame order ``in_1, tgt_1, ..., in_N, tgt_N, query``) and the *target* stream (noisy target latents);
- full bidirectional joint attention over ``[condition ; target]``, GQA, QK RMSNorm over the whole projected width
  (not per head), 3D RoPE (rotate-half inside each third of the head dim: time | height | width);
- scale-only adaLN modulation (no shift), tanh gates, sandwich RMSNorm on each branch output, SwiGLU MLPs;
- learned type vectors added to the *timestep* vector (``t_cond = t + e_prompt``, ``t_x = t + e_answer``);
- the flow time ``t`` in [0, 1] (t = 1 is data) goes into the sinusoidal embedding unscaled;
- the final layer runs on the target stream only and returns fp32.

The state dict uses genvis module names; :func:`convert_official_lavin_dit_state_dict` maps the official released
layout (``lavin_dit.safetensors``) onto it. Tests: tests/lavin/test_lavin_dit_model.py (zero-init identity, gradients,
round trip, official layout, packed == padded, GQA/RoPE reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from genvis.layers import (
    AdaLNModulation,
    Attention,
    PatchEmbed,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    attention,
    cu_seqlens_from_lengths,
    grid_position_ids,
    modulate,
    patchify,
    unpatchify,
)

__all__ = [
    "LAVIN_DIT_PRESETS",
    "PREDICTION_TYPES",
    "LaVinDiTBlock",
    "LaVinDiTTransformer3DModel",
    "LaVinDiTTransformerOutput",
    "convert_official_lavin_dit_state_dict",
    "lavin_dit_mlp_hidden_dim",
]


def lavin_dit_mlp_hidden_dim(dim: int) -> int:
    """SwiGLU width of the official code: ``floor(8 * dim / 3 / 64) * 64`` (2304 -> 6144, 1152 -> 3072)."""
    return int((4 * dim * 2 / 3) / 64) * 64


# Size presets. "3.4B" is the released ``LaVinDiT_3B_2``; "1.0B" uses the official class defaults (1152/28/16) with
# GQA-4; "0.1B" is not published (spec §1.5 [inf]); "tiny" is the CPU/CI size. attention_head_dim is 72 (or 24 for
# tiny) because the 3D RoPE needs head_dim % 6 == 0. in_channels defaults to the ST-VAE's 16; train/lavin_dit.py sets it
# from the VAE it uses.
LAVIN_DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2, "attention_head_dim": 24},
    "0.1B": {"num_layers": 10, "num_attention_heads": 8, "num_kv_heads": 8, "attention_head_dim": 72},
    "1.0B": {"num_layers": 28, "num_attention_heads": 16, "num_kv_heads": 4, "attention_head_dim": 72},
    "3.4B": {"num_layers": 22, "num_attention_heads": 32, "num_kv_heads": 8, "attention_head_dim": 72},
}


# What the head predicts; the model always returns a velocity. "velocity": the official head. "sample": the clean
# latents x (x-prediction). "query_residual": x minus the query latents (the untrained model copies the query).
PREDICTION_TYPES = ("velocity", "sample", "query_residual")
MIN_VELOCITY_DENOMINATOR = 0.05


@dataclass
class LaVinDiTTransformerOutput(BaseOutput):
    """Output of :class:`LaVinDiTTransformer3DModel`.

    Args:
        sample: predicted velocity ``data - noise`` of the target latents, ``(B, C, T_x, H, W)`` in fp32 (or a list of
            ``(C, T_x_i, H, W)`` tensors when the input was a list).
    """

    sample: torch.Tensor | list[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# 3D rotary embedding
# ---------------------------------------------------------------------------------------------------------------


class LaVinDiTRotaryEmbedding3D(nn.Module):
    """3D RoPE: the head dim is cut into three equal thirds (t | h | w), each rotated rotate-half style by its axis.

    Args:
        head_dim: per-head width; must be divisible by 6 (three even thirds).
        theta: frequency base.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 6 != 0:
            raise ValueError(
                f"attention_head_dim must be divisible by 6 for the 3D RoPE (three even thirds), got {head_dim}"
            )
        self.axis_dim = head_dim // 3
        # every axis uses the same ladder theta^(-2i/(hd/3)), so one 1-axis table serves all three
        self.axis_rope = RotaryEmbedding(self.axis_dim, [self.axis_dim], theta=theta, interleaved=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, 3)`` integer (t, h, w) ids -> ``(cos, sin)`` of shape ``(S, head_dim)``, thirds side by side."""
        tables = [self.axis_rope(position_ids[:, axis : axis + 1]) for axis in range(3)]
        return torch.cat([c for c, _ in tables], dim=-1), torch.cat([s for _, s in tables], dim=-1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``(..., S, H, head_dim)`` third by third (fp32 math, cast back)."""
        x_float = x.float()
        # rotate-half inside each third in one op: (..., 3, 2, third/2) halves -> (-second, first)
        halves = x_float.unflatten(-1, (3, 2, self.axis_dim // 2))
        rotated = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).flatten(-3)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (S, hd) -> (S, 1, hd), broadcast over heads
        return (x_float * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Joint attention and block
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _JointLayout:
    """How the two streams interleave into one attention problem.

    Padded batch: ``order is None`` and the joint sequence of each sample is ``[cond ; target]``. Packed: the streams
    are single rows ``(1, N_c, D)`` / ``(1, N_x, D)`` of several samples; ``order`` gathers the stream-concatenated
    tokens into per-sample joint order ``[cond_0, tgt_0, cond_1, tgt_1, ...]``, ``inverse`` undoes it, ``cu_seqlens``
    delimits the samples (``target_cu_seqlens`` the target stream alone) and ``*_sample_index`` map each token to its sample (for the per-sample modulation).
    """

    rotary: tuple[torch.Tensor, torch.Tensor]
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    target_cu_seqlens: torch.Tensor | None = None
    cond_sample_index: torch.Tensor | None = None
    target_sample_index: torch.Tensor | None = None


def _per_token(vector: torch.Tensor, sample_index: torch.Tensor | None) -> torch.Tensor:
    """``(B, D)`` per-sample vector -> ``(B, 1, D)`` (padded) or ``(1, N, D)`` (packed, gathered per token)."""
    return vector.unsqueeze(1) if sample_index is None else vector[sample_index].unsqueeze(0)


class LaVinDiTBlock(nn.Module):
    """Two-stream J-DiT block: joint attention + per-stream SwiGLU, scale-only modulation, sandwich norms, tanh gates.

    Args:
        dim: model width.
        num_attention_heads: query heads.
        num_kv_heads: key/value heads (GQA).
        attention_head_dim: per-head width.
        mlp_hidden_dim: SwiGLU inner width.
        eps: RMSNorm epsilon.
        context_pre_only: last block: the condition stream only supplies keys/values (its queries, output projection,
            MLP and their modulation cannot reach the prediction, so they are left out, as in SD3's last block).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        num_kv_heads: int,
        attention_head_dim: int,
        mlp_hidden_dim: int,
        eps: float = 1e-6,
        context_pre_only: bool = False,
    ) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only
        # parameter-free norms are shared by both streams, as in the official block
        self.norm1 = RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.post_norm1 = RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.post_norm2 = RMSNorm(dim, eps=eps, elementwise_affine=False)

        def stream_attention() -> Attention:
            return Attention(
                dim,
                num_attention_heads,
                num_kv_heads=num_kv_heads,
                head_dim=attention_head_dim,
                qk_norm="rms",
                qk_norm_across_heads=True,
                bias=False,
                out_bias=False,
                eps=eps,
            )

        self.context_attn, self.target_attn = stream_attention(), stream_attention()
        self.target_ff = SwiGLU(dim, mlp_hidden_dim, bias=False)
        # per stream: (scale, gate) for attention, then (scale, gate) for the MLP
        self.target_modulation = AdaLNModulation(dim, dim, num_branches=2, mode="scale_tanh_gate")
        if context_pre_only:
            del self.context_attn.to_q, self.context_attn.norm_q, self.context_attn.to_out
            self.context_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))  # scale_attn only
        else:
            self.context_ff = SwiGLU(dim, mlp_hidden_dim, bias=False)
            self.context_modulation = AdaLNModulation(dim, dim, num_branches=2, mode="scale_tanh_gate")

    @staticmethod
    def _modulation(
        modulation: AdaLNModulation, temb: torch.Tensor, sample_index: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """``[scale_attn, tanh(gate_attn), scale_mlp, tanh(gate_mlp)]``, each broadcastable against the tokens."""
        return [_per_token(v, sample_index) for _, scale, gate in modulation(temb) for v in (scale, gate)]

    @staticmethod
    def _heads(tensor: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
        return tensor.unflatten(-1, (num_heads, head_dim))  # (B, N, H*hd) -> (B, N, H, hd)

    def joint_attention(
        self, context: torch.Tensor, target: torch.Tensor, layout: _JointLayout, rope: LaVinDiTRotaryEmbedding3D
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Joint attention of the (already normalised and modulated) streams; returns the projected outputs."""
        ca, xa = self.context_attn, self.target_attn
        num_context = context.shape[1]
        hd = xa.head_dim
        # QK-norm over the full projected width, then split heads
        key = torch.cat([ca.norm_k(ca.to_k(context)), xa.norm_k(xa.to_k(target))], dim=1)
        value = torch.cat([ca.to_v(context), xa.to_v(target)], dim=1)
        key, value = self._heads(key, xa.num_kv_heads, hd), self._heads(value, xa.num_kv_heads, hd)
        target_query = self._heads(xa.norm_q(xa.to_q(target)), xa.num_heads, hd)
        cos, sin = layout.rotary  # (N_c + N_x, hd), stream-concatenated like key/value
        key = rope.apply(key, cos, sin)

        if self.context_pre_only:
            # only target queries: (B, N_x, H, hd) against the joint keys
            query = rope.apply(target_query, cos[num_context:], sin[num_context:])
            if layout.order is None:
                out = attention(query, key, value)
            else:
                key, value = key[0, layout.order], value[0, layout.order]
                k_bounds, q_bounds = layout.cu_seqlens.tolist(), layout.target_cu_seqlens.tolist()
                out = torch.cat(
                    [
                        attention(query[:, qs:qe], key[None, ks:ke], value[None, ks:ke])
                        for qs, qe, ks, ke in zip(q_bounds[:-1], q_bounds[1:], k_bounds[:-1], k_bounds[1:])
                    ],
                    dim=1,
                )
            return None, xa.to_out(out.flatten(-2))

        context_query = self._heads(ca.norm_q(ca.to_q(context)), ca.num_heads, hd)
        query = rope.apply(torch.cat([context_query, target_query], dim=1), cos, sin)
        if layout.order is None:
            out = attention(query, key, value)  # (B, S, H, hd), full bidirectional, scale hd^-0.5
        else:
            # packed: (1, S, H, hd) -> per-sample joint order (S, H, hd), attend inside each sample, restore
            order = layout.order
            out = attention(query[0, order], key[0, order], value[0, order], cu_seqlens=layout.cu_seqlens)
            out = out[layout.inverse].unsqueeze(0)
        out = out.flatten(-2)  # (B, S, H*hd)
        return ca.to_out(out[:, :num_context]), xa.to_out(out[:, num_context:])

    def forward(
        self,
        context: torch.Tensor,
        target: torch.Tensor,
        temb_context: torch.Tensor,
        temb_target: torch.Tensor,
        layout: _JointLayout,
        rope: LaVinDiTRotaryEmbedding3D,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
        context: condition tokens ``(B, N_c, D)`` (or ``(1, sum N_c, D)`` packed).
        target: target tokens ``(B, N_x, D)`` (or packed).
        temb_context: ``(B, D)`` timestep + prompt type vector per sample.
        temb_target: ``(B, D)`` timestep + answer type vector per sample.
        layout: joint attention layout (RoPE tables, packing indices).
        rope: the model's 3D RoPE helper.
        """
        x_scale_attn, x_gate_attn, x_scale_mlp, x_gate_mlp = self._modulation(
            self.target_modulation, temb_target, layout.target_sample_index
        )
        if self.context_pre_only:
            c_scale_attn = _per_token(self.context_modulation(temb_context), layout.cond_sample_index)
        else:
            c_scale_attn, c_gate_attn, c_scale_mlp, c_gate_mlp = self._modulation(
                self.context_modulation, temb_context, layout.cond_sample_index
            )

        # 1. joint attention: pre-norm -> x(1+s) -> attention -> sandwich norm -> tanh-gated residual
        context_attn, target_attn = self.joint_attention(
            modulate(self.norm1(context), c_scale_attn), modulate(self.norm1(target), x_scale_attn), layout, rope
        )
        target = target + x_gate_attn * self.post_norm1(target_attn)
        # 2. per-stream SwiGLU with the same pattern
        target = target + x_gate_mlp * self.post_norm2(self.target_ff(modulate(self.norm2(target), x_scale_mlp)))
        if not self.context_pre_only:
            context = context + c_gate_attn * self.post_norm1(context_attn)
            context = context + c_gate_mlp * self.post_norm2(
                self.context_ff(modulate(self.norm2(context), c_scale_mlp))
            )
        return context, target


class LaVinDiTFinalLayer(nn.Module):
    """Target-stream head: RMSNorm (no affine) -> ``x * (1 + scale(t_x))`` -> Linear to patch pixels.

    Args:
        dim: model width.
        out_features: ``patch * patch * out_channels``.
        eps: RMSNorm epsilon.
    """

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.act = nn.SiLU()
        self.modulation = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, out_features)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, sample_index: torch.Tensor | None):
        scale = _per_token(self.modulation(self.act(temb)), sample_index)
        return self.proj(modulate(self.norm(hidden_states), scale))


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class LaVinDiTTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """The LaVin-DiT J-DiT: predicts the rectified-flow velocity of target latents given clean in-context latents.

    Args:
        in_channels: latent channels (16 for the ST-VAE).
        out_channels: predicted channels; defaults to ``in_channels``.
        patch_size: spatial patch size (each latent frame is cut into ``patch x patch`` tokens).
        num_layers: number of two-stream blocks.
        num_attention_heads: query heads.
        num_kv_heads: key/value heads (GQA; official ``kv_group = num_attention_heads / num_kv_heads``).
        attention_head_dim: per-head width; must be divisible by 6 (3D RoPE thirds).
        mlp_hidden_dim: SwiGLU width; defaults to the official ``floor(8D/3/64)*64``.
        timestep_embed_dim: width of the sinusoidal timestep features.
        rope_theta: RoPE frequency base.
        norm_eps: RMSNorm epsilon.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LaVinDiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int | None = None,
        patch_size: int = 2,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        num_kv_heads: int | None = 4,
        attention_head_dim: int = 72,
        mlp_hidden_dim: int | None = None,
        timestep_embed_dim: int = 256,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        query_skip: bool = False,
        query_skip_kernel: int = 1,
        context_summary: bool = False,
        prediction_type: str = "velocity",
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_attention_heads
        for name, value in (
            ("in_channels", in_channels),
            ("patch_size", patch_size),
            ("num_layers", num_layers),
            ("num_attention_heads", num_attention_heads),
            ("num_kv_heads", num_kv_heads),
            ("attention_head_dim", attention_head_dim),
            ("timestep_embed_dim", timestep_embed_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_attention_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if attention_head_dim % 6 != 0:
            raise ValueError(
                f"attention_head_dim must be divisible by 6 for the 3D RoPE (three even thirds), got {attention_head_dim}"
            )
        if not isinstance(query_skip_kernel, int) or query_skip_kernel < 1 or query_skip_kernel % 2 == 0:
            raise ValueError(f"query_skip_kernel must be an odd positive int, got {query_skip_kernel!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        dim = num_attention_heads * attention_head_dim
        mlp_hidden_dim = mlp_hidden_dim or lavin_dit_mlp_hidden_dim(dim)
        if mlp_hidden_dim < 1:
            raise ValueError(f"mlp_hidden_dim must be positive, got {mlp_hidden_dim} (width {dim} is below 24)")
        self.inner_dim = dim
        self.out_channels = out_channels or in_channels

        # 1. per-stream patch embedding: linear over (1, p, p) patches of every latent frame, then LayerNorm
        patch = (1, patch_size, patch_size)
        self.context_embedder = PatchEmbed(in_channels, dim, patch)
        self.context_embedder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.target_embedder = PatchEmbed(in_channels, dim, patch)
        self.target_embedder_norm = nn.LayerNorm(dim, eps=1e-5)
        # genvis option (not in the official model): each target token also sees the query patch at its own
        # (frame, row, column), through a zero-initialised linear added before the embedder norm; with
        # query_skip_kernel k > 1, the k x k query patches around it (zero-padded at the borders) in the same frame
        self.query_skip_kernel = query_skip_kernel
        if not query_skip:
            self.query_embedder = None
        elif query_skip_kernel == 1:
            self.query_embedder = PatchEmbed(in_channels, dim, patch)
        else:
            self.query_embedder = nn.Linear(in_channels * patch_size**2 * query_skip_kernel**2, dim)
        # genvis option: a task vector from the context pairs (per-token MLP over each (input, target) patch pair,
        # averaged over every token of every pair, last layer zero-initialised) added to both timestep vectors, so
        # adaLN sees the task the way a class-conditional DiT sees its label
        pair_features = 2 * in_channels * patch_size * patch_size
        self.pair_encoder = (
            nn.Sequential(nn.Linear(pair_features, dim), nn.SiLU(), nn.Linear(dim, dim)) if context_summary else None
        )

        # 2. timestep (flow time in [0,1], cos half first) and the stream type vectors added to it
        self.time_proj = Timesteps(timestep_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(timestep_embed_dim, dim)
        self.context_type_embed = nn.Parameter(torch.zeros(1, dim))
        self.target_type_embed = nn.Parameter(torch.zeros(1, dim))

        # 3. blocks and head
        self.rope = LaVinDiTRotaryEmbedding3D(attention_head_dim, theta=rope_theta)
        self.transformer_blocks = nn.ModuleList(
            [
                LaVinDiTBlock(
                    dim,
                    num_attention_heads,
                    num_kv_heads,
                    attention_head_dim,
                    mlp_hidden_dim,
                    norm_eps,
                    context_pre_only=index == num_layers - 1,
                )
                for index in range(num_layers)
            ]
        )
        self.final_layer = LaVinDiTFinalLayer(dim, patch_size * patch_size * self.out_channels, norm_eps)
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LaVinDiTTransformer3DModel:
        """Build a randomly initialised model from :data:`LAVIN_DIT_PRESETS` (``overrides`` replace config fields)."""
        if name not in LAVIN_DIT_PRESETS:
            raise ValueError(f"unknown LaVin-DiT preset {name!r}; expected one of {sorted(LAVIN_DIT_PRESETS)}")
        return cls(**{**LAVIN_DIT_PRESETS[name], **overrides})

    def initialize_weights(self) -> None:
        """Official init: xavier-uniform Linears (zero bias), N(0, 0.02) type vectors and timestep MLP, and zero
        modulation/output layers so that every block starts as the identity and the initial prediction is 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.context_embedder, self.target_embedder):
            # the patch conv is a Linear over flattened patches: xavier with the Linear's fans
            weight = embedder.proj.weight
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)
        if self.pair_encoder is not None:  # starts as the official model: the task vector is exactly 0
            nn.init.zeros_(self.pair_encoder[-1].weight)
            nn.init.zeros_(self.pair_encoder[-1].bias)
        if self.query_embedder is not None:  # starts as the official model: the skip adds exactly 0
            skip = self.query_embedder.proj if isinstance(self.query_embedder, PatchEmbed) else self.query_embedder
            nn.init.zeros_(skip.weight)
            nn.init.zeros_(skip.bias)
        nn.init.normal_(self.context_type_embed, std=0.02)
        nn.init.normal_(self.target_type_embed, std=0.02)
        nn.init.normal_(self.time_embedding.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_2.weight, std=0.02)
        # zero modulation => scale 0 and tanh(0) = 0 gates: each block is the identity at step 0
        for block in self.transformer_blocks:
            for modulation in (block.context_modulation, block.target_modulation):
                linear = modulation.linear if isinstance(modulation, AdaLNModulation) else modulation[-1]
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        # zero head => the initial velocity prediction is exactly 0
        for layer in (self.final_layer.modulation, self.final_layer.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -----------------------------------------------------------------------------------------------------------
    def _check_sample(self, target: torch.Tensor, context: torch.Tensor, where: str) -> None:
        p = self.config.patch_size
        for name, tensor in (("hidden_states", target), ("encoder_hidden_states", context)):
            if tensor.ndim != 4 or tensor.shape[0] != self.config.in_channels:
                raise ValueError(
                    f"{name}{where} must be (C={self.config.in_channels}, T, H, W) per sample, got {tuple(tensor.shape)}"
                )
            if tensor.shape[-2] % p or tensor.shape[-1] % p:
                raise ValueError(f"{name}{where} spatial size {tuple(tensor.shape[-2:])} is not divisible by {p}")
        if target.shape[-2:] != context.shape[-2:]:
            raise ValueError(
                f"hidden_states{where} and encoder_hidden_states{where} must share H, W; got "
                f"{tuple(target.shape[-2:])} and {tuple(context.shape[-2:])}"
            )

    def _embed(self, embedder: PatchEmbed, norm: nn.LayerNorm, latents: torch.Tensor):
        # a Linear over flattened (C, 1, p, p) patches == the patch conv, without the slow small-conv3d path
        patches, grid = patchify(latents, embedder.patch_size)  # (B, T*h*w, C*p*p), frame-major, row, column
        return norm(embedder.forward_patches(patches)), grid

    def _task_vector(self, contexts, targets) -> torch.Tensor:
        """``(B, D)`` mean of ``pair_encoder`` over the (input, target) patch pairs of each condition stream.

        A stream of ``T_c = 2 N T_x + T_x`` frames holds ``N`` pairs of ``T_x``-frame clips before the query; any other
        length (the unconditional ``[zero frame, query]`` branch) has no pairs and gets a zero vector.
        """
        patch = self.context_embedder.patch_size
        # a sample without pairs still touches every pair_encoder weight (times 0): under DDP each rank then reduces
        # the same gradients even when all its samples had their context dropped
        no_pairs = sum(p.sum() for p in self.pair_encoder.parameters()) * 0.0
        vectors = []
        for context, target in zip(contexts, targets):  # per sample: (C, T_c, H, W), (C, T_x, H, W)
            frames, clip = context.shape[1], target.shape[1]
            num_pairs, rest = divmod(frames - clip, 2 * clip)
            if rest or num_pairs < 1:
                vectors.append(no_pairs.expand(self.inner_dim))
                continue
            pairs = context[:, : 2 * num_pairs * clip].unflatten(1, (num_pairs, 2, clip))  # (C, N, 2, T_x, H, W)
            inputs, _ = patchify(pairs[:, :, 0].flatten(1, 2)[None], patch)  # (1, N*T_x*h*w, C*p*p)
            outputs, _ = patchify(pairs[:, :, 1].flatten(1, 2)[None], patch)
            vectors.append(self.pair_encoder(torch.cat([inputs[0], outputs[0]], dim=-1)).mean(0))
        return torch.stack(vectors)

    def _embed_target(self, target: torch.Tensor, context: torch.Tensor):
        """Target tokens of ``(B, C, T_x, H, W)`` latents (+ the query skip over the last ``T_x`` condition frames)."""
        patch = self.target_embedder.patch_size
        patches, grid = patchify(target, patch)
        query = patchify(context[:, :, -target.shape[2] :], patch)[0] if self.query_embedder is not None else None
        return self.target_embedder_norm(self._target_tokens(patches, query, [grid] * len(patches))), grid

    def _target_tokens(self, patches: torch.Tensor, query_patches, grids) -> torch.Tensor:
        """Embed ``(B, N, C*p*p)`` target patches (``(N, C*p*p)`` packed); with ``query_skip`` add the embedded query
        patches at the same positions (``query_patches`` like ``patches``; ``grids``: each sample's token grid)."""
        tokens = self.target_embedder.forward_patches(patches)
        if self.query_embedder is None:
            return tokens
        if self.query_skip_kernel == 1:
            return tokens + self.query_embedder.forward_patches(query_patches)
        k = self.query_skip_kernel
        packed = query_patches.ndim == 2
        samples = query_patches.split([math.prod(g) for g in grids]) if packed else list(query_patches)
        neighbourhoods = []
        for sample, (frames, rows, cols) in zip(samples, grids):  # (T*h*w, F) frame-major -> (T*h*w, F*k*k)
            per_frame = sample.reshape(frames, rows, cols, -1).permute(0, 3, 1, 2)
            windows = F.unfold(per_frame, kernel_size=k, padding=k // 2)  # (T, F*k*k, h*w)
            neighbourhoods.append(windows.transpose(1, 2).reshape(frames * rows * cols, -1))
        features = torch.cat(neighbourhoods) if packed else torch.stack(neighbourhoods)
        return tokens + self.query_embedder(features)

    def _positions(self, context_grid, target_grid, device) -> tuple[torch.Tensor, torch.Tensor]:
        # frames are told apart only by t: context 0..T_c-1, target T_c..; every frame shares the spatial grid
        context_ids = grid_position_ids(context_grid, device=device)
        target_ids = grid_position_ids(target_grid, device=device, offset=(context_grid[0], 0, 0))
        return context_ids, target_ids

    def forward(
        self,
        hidden_states: torch.Tensor | list[torch.Tensor],
        encoder_hidden_states: torch.Tensor | list[torch.Tensor],
        timestep: torch.Tensor | float,
        return_dict: bool = True,
    ) -> LaVinDiTTransformerOutput | tuple:
        """Predict the velocity of the target latents.

        Args:
            hidden_states: noisy target latents ``(B, C, T_x, H, W)``, or a list of ``(C, T_x_i, H_i, W_i)`` samples
                (packed: samples may differ in frame counts and size).
            encoder_hidden_states: clean condition latents, frames ``in_1, tgt_1, ..., in_N, tgt_N, query``,
                ``(B, C, T_c, H, W)`` or a list of ``(C, T_c_i, H_i, W_i)`` matching ``hidden_states``.
            timestep: flow time in [0, 1] (0 = noise, 1 = data), scalar or ``(B,)``.
            return_dict: return a :class:`LaVinDiTTransformerOutput` instead of a tuple.

        Returns:
            The velocity ``data - noise`` in fp32, shaped like ``hidden_states``.
        """
        packed = isinstance(hidden_states, (list, tuple))
        if packed != isinstance(encoder_hidden_states, (list, tuple)):
            raise ValueError("hidden_states and encoder_hidden_states must both be tensors or both be lists")
        if packed:
            if len(hidden_states) != len(encoder_hidden_states) or not hidden_states:
                raise ValueError(
                    f"got {len(hidden_states)} target samples and {len(encoder_hidden_states)} condition samples; "
                    "expected the same non-zero number"
                )
            for i, (target, context) in enumerate(zip(hidden_states, encoder_hidden_states)):
                self._check_sample(target, context, f"[{i}]")
            batch = len(hidden_states)
            device = hidden_states[0].device
        else:
            if hidden_states.ndim != 5 or encoder_hidden_states.ndim != 5:
                raise ValueError(
                    "hidden_states and encoder_hidden_states must be (B, C, T, H, W), got "
                    f"{tuple(hidden_states.shape)} and {tuple(encoder_hidden_states.shape)}"
                )
            if hidden_states.shape[0] != encoder_hidden_states.shape[0]:
                raise ValueError(
                    f"batch sizes differ: hidden_states {hidden_states.shape[0]}, "
                    f"encoder_hidden_states {encoder_hidden_states.shape[0]}"
                )
            self._check_sample(hidden_states[0], encoder_hidden_states[0], "")
            batch, device = hidden_states.shape[0], hidden_states.device

        timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or shape ({batch},), got {tuple(timestep.shape)}")

        # 1. timestep vector per sample, plus the stream type vectors
        temb = self.time_embedding(self.time_proj(timestep).to(self.dtype))  # (B, D)
        if self.pair_encoder is not None:
            temb = temb + self._task_vector(encoder_hidden_states, hidden_states)
        temb_context, temb_target = temb + self.context_type_embed, temb + self.target_type_embed

        # 2. patch embedding, positions and the joint-attention layout
        if not packed:
            context, context_grid = self._embed(
                self.context_embedder, self.context_embedder_norm, encoder_hidden_states
            )
            target, target_grid = self._embed_target(hidden_states, encoder_hidden_states)
            positions = torch.cat(self._positions(context_grid, target_grid, device), dim=0)  # (S, 3)
            layout = _JointLayout(rotary=self.rope(positions))
            target_grids = [target_grid] * batch
        else:
            layout, context, target, target_grids = self._packed_layout(hidden_states, encoder_hidden_states)

        # 3. blocks
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                context, target = self._gradient_checkpointing_func(
                    block, context, target, temb_context, temb_target, layout, self.rope
                )
            else:
                context, target = block(context, target, temb_context, temb_target, layout, self.rope)

        # 4. head on the target stream, unpatchify to (B, C, T_x, H, W), fp32 out
        target = self.final_layer(target, temb_target, layout.target_sample_index).float()
        patch = (1, self.config.patch_size, self.config.patch_size)
        if not packed:
            sample = unpatchify(target, target_grids[0], patch, self.out_channels)
        else:
            lengths = [math.prod(g) for g in target_grids]
            sample = [
                unpatchify(tokens, grid, patch, self.out_channels)[0]
                for tokens, grid in zip(target.split(lengths, dim=1), target_grids)
            ]
        if self.config.prediction_type != "velocity":
            if packed:
                sample = [
                    self._to_velocity(x[None], out[None], context[None], t[None])[0]
                    for x, out, context, t in zip(hidden_states, sample, encoder_hidden_states, timestep)
                ]
            else:
                sample = self._to_velocity(hidden_states, sample, encoder_hidden_states, timestep)
        if not return_dict:
            return (sample,)
        return LaVinDiTTransformerOutput(sample=sample)

    def _to_velocity(self, noisy, output, context, timestep) -> torch.Tensor:
        """Head output -> velocity ``(x_hat - x_t) / (1 - t)`` for the ``sample`` / ``query_residual`` heads.

        ``x_hat`` is the head output (``sample``) or the query latents plus it (``query_residual``: an untrained model
        answers with the query itself). ``1 - t`` is clamped at :data:`MIN_VELOCITY_DENOMINATOR` as in x-prediction
        DiTs, so the velocity stays finite near t = 1.
        """
        data = output
        if self.config.prediction_type == "query_residual":
            data = output + context[:, :, -noisy.shape[2] :].float()
        remaining = (1 - timestep.float()).clamp_min(MIN_VELOCITY_DENOMINATOR).view(-1, 1, 1, 1, 1)
        return (data - noisy.float()) / remaining

    def _packed_layout(self, targets: list[torch.Tensor], contexts: list[torch.Tensor]):
        """Embed variable-length samples into two packed streams and build the index maps of :class:`_JointLayout`."""
        device = targets[0].device
        context_patches, target_patches, context_ids, target_ids, target_grids = [], [], [], [], []
        patch = self.context_embedder.patch_size
        for target, context in zip(targets, contexts):
            c_patches, c_grid = patchify(context[None], patch)  # (1, N_c, C*p*p)
            x_patches, x_grid = patchify(target[None], patch)
            c_ids, x_ids = self._positions(c_grid, x_grid, device)
            context_patches.append(c_patches[0])
            target_patches.append(x_patches[0])
            context_ids.append(c_ids)
            target_ids.append(x_ids)
            target_grids.append(x_grid)
        # one embedding call per stream over all samples: (sum N, C*p*p) -> (1, sum N, D)
        context_tokens = self.context_embedder_norm(self.context_embedder.forward_patches(torch.cat(context_patches)))
        # the query is the tail of each condition stream: its patches are the last rows of the context patches
        query_patches = torch.cat([c[-len(x) :] for c, x in zip(context_patches, target_patches)])
        target_tokens = self.target_embedder_norm(
            self._target_tokens(torch.cat(target_patches), query_patches, target_grids)
        )
        c_lengths = torch.tensor([t.shape[0] for t in context_patches], device=device)
        x_lengths = torch.tensor([t.shape[0] for t in target_patches], device=device)
        num_context = int(c_lengths.sum())
        c_starts = torch.cumsum(c_lengths, 0) - c_lengths
        x_starts = num_context + torch.cumsum(x_lengths, 0) - x_lengths
        # stream-concatenated index -> per-sample joint order [cond_i ; target_i]
        order = torch.cat(
            [
                torch.cat([torch.arange(cs, cs + cl, device=device), torch.arange(xs, xs + xl, device=device)])
                for cs, cl, xs, xl in zip(c_starts.tolist(), c_lengths.tolist(), x_starts.tolist(), x_lengths.tolist())
            ]
        )
        sample_ids = torch.arange(len(targets), device=device)
        layout = _JointLayout(
            rotary=self.rope(torch.cat(context_ids + target_ids, dim=0)),
            order=order,
            inverse=torch.argsort(order),
            cu_seqlens=cu_seqlens_from_lengths(c_lengths + x_lengths, device=device),
            target_cu_seqlens=cu_seqlens_from_lengths(x_lengths, device=device),
            cond_sample_index=sample_ids.repeat_interleave(c_lengths),
            target_sample_index=sample_ids.repeat_interleave(x_lengths),
        )
        return layout, context_tokens[None], target_tokens[None], target_grids


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoint layout
# ---------------------------------------------------------------------------------------------------------------

# official block sub-key -> genvis block sub-key (``blocks.{i}.`` -> ``transformer_blocks.{i}.``)
_OFFICIAL_BLOCK_KEYS: dict[str, str] = {
    **{
        f"joint_attn.{src}_{name}": f"{dst}_attn.{new}"
        for src, dst in (("cond", "context"), ("x", "target"))
        for name, new in (
            ("q.weight", "to_q.weight"),
            ("k.weight", "to_k.weight"),
            ("v.weight", "to_v.weight"),
            ("qnorm.weight", "norm_q.weight"),
            ("knorm.weight", "norm_k.weight"),
            ("proj.weight", "to_out.weight"),
        )
    },
    **{
        f"{src}_mlp.{name}.weight": f"{dst}_ff.{new}.weight"
        for src, dst in (("cond", "context"), ("x", "target"))
        for name, new in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
    },
    **{
        f"{src}_modulation.1.{kind}": f"{dst}_modulation.linear.{kind}"
        for src, dst in (("cond", "context"), ("x", "target"))
        for kind in ("weight", "bias")
    },
}
# in the official last block the condition stream's queries, output projection and MLP never reach the prediction
_OFFICIAL_LAST_BLOCK_UNUSED: frozenset[str] = frozenset(
    {
        "joint_attn.cond_q.weight",
        "joint_attn.cond_qnorm.weight",
        "joint_attn.cond_proj.weight",
        "cond_mlp.gate_proj.weight",
        "cond_mlp.up_proj.weight",
        "cond_mlp.down_proj.weight",
    }
)
_OFFICIAL_TOP_KEYS: dict[str, str] = {
    "cond_embedder.0.bias": "context_embedder.proj.bias",
    "cond_embedder.1.weight": "context_embedder_norm.weight",
    "cond_embedder.1.bias": "context_embedder_norm.bias",
    "x_embedder.0.bias": "target_embedder.proj.bias",
    "x_embedder.1.weight": "target_embedder_norm.weight",
    "x_embedder.1.bias": "target_embedder_norm.bias",
    "prompt_embed": "context_type_embed",
    "answer_embed": "target_type_embed",
    "t_embedder.mlp.0.weight": "time_embedding.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_embedding.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_embedding.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_embedding.linear_2.bias",
    "final_layer.adaLN_modulation.1.weight": "final_layer.modulation.weight",
    "final_layer.adaLN_modulation.1.bias": "final_layer.modulation.bias",
}


def convert_official_lavin_dit_state_dict(
    state_dict: dict[str, torch.Tensor], patch_size: int = 2, in_channels: int = 16
) -> dict[str, torch.Tensor]:
    """Map the official LaVin-DiT state dict (``lib/model/dit.py`` names) onto :class:`LaVinDiTTransformer3DModel`.

        Official patch vectors are ordered ``(ph, pw, C)``; genvis patches are channel-major ``(C, ph, pw)`` (a conv
        kernel), so the patch-embed columns and the output-head rows are permuted. A leading ``module.`` (DDP) prefix is
        stripped. In the last block, the condition stream's query/output projections, MLP and all modulation chunks but
    ``scale_attn`` are dropped: they cannot influence the output (the head reads the target stream only), and genvis
    leaves them out so that every parameter is trained and DDP needs no ``find_unused_parameters``. Unknown keys raise a
    ``ValueError`` listing them.

        Args:
            state_dict: official tensors, e.g. ``safetensors.torch.load_file("weights/lavin_dit.safetensors")``.
            patch_size: the model's patch size (2 for every released size).
            in_channels: latent channels (16).

        Returns:
            A state dict for ``LaVinDiTTransformer3DModel.load_state_dict(..., strict=True)``.
    """
    p, c = patch_size, in_channels
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    block_ids = [int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")]
    last_block = max(block_ids, default=-1)
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _OFFICIAL_TOP_KEYS:
            converted[_OFFICIAL_TOP_KEYS[key]] = value
        elif key in ("cond_embedder.0.weight", "x_embedder.0.weight"):
            stream = "context" if key.startswith("cond") else "target"
            dim = value.shape[0]
            # (D, ph*pw*C) -> (D, C, 1, ph, pw) conv kernel
            converted[f"{stream}_embedder.proj.weight"] = value.reshape(dim, p, p, c).permute(0, 3, 1, 2).unsqueeze(2)
        elif key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            # rows (ph, pw, C) -> (C, ph, pw), the order unpatchify expects
            rows = value.reshape(p, p, c, *value.shape[1:])
            converted[key.replace("linear", "proj")] = rows.permute(2, 0, 1, *range(3, rows.ndim)).reshape(value.shape)
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            if rest not in _OFFICIAL_BLOCK_KEYS:
                unknown.append(key)
            elif int(index) == last_block and rest in _OFFICIAL_LAST_BLOCK_UNUSED:
                continue  # cannot reach the output (context_pre_only)
            elif int(index) == last_block and rest.startswith("cond_modulation."):
                # keep the scale_attn chunk (the first of scale_msa, gate_msa, scale_mlp, gate_mlp)
                converted[f"transformer_blocks.{index}.context_modulation.1.{rest.rsplit('.', 1)[1]}"] = value.chunk(
                    4, dim=0
                )[0]
            else:
                converted[f"transformer_blocks.{index}.{_OFFICIAL_BLOCK_KEYS[rest]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the official LaVin-DiT state dict: {unknown[:10]}")
    return converted
