"""MVDiT: the multi-modal video diffusion transformer of OpenVid-1M.

Paper: "OpenVid-1M: A Large-Scale High-Quality Dataset for Text-to-video Generation", arXiv 2407.02371 (ICLR 2025).
Block structure follows the official code (``NJU-PCALab/OpenVid-1M``, ``openvid/models/mvdit/mvdit.py``), see
/work/shared/specs/lavin_dit_mvdit.md §3.1-3.2 and §3.6:

- two token streams: video ``x`` (per frame ``S`` patch tokens) and text ``y``; the caption embedding is replicated for
  every frame and then evolves separately per frame;
- per block: (1) MMSA, multi-modal self-attention per frame over ``[S video ; L text]`` tokens with one *shared* qkv
  (padded text keys masked); (2) MMTA, multi-modal temporal attention across the ``T`` frames for every video token and
  every text slot, shared qkv, a fixed 1D sin-cos time embedding added to its input in block 0 only, zero-initialised
  output projection; (3) MHCA, cross-attention from the raw video tokens to the current text tokens of the same frame
  (no norm, no gate), zero-initialised output projection; (4) separate GELU-tanh FFNs for the two streams;
- adaLN-single (PixArt-alpha): one timestep MLP feeds four global projections (6D video, 6D text, 3D video-temporal,
  3D text-temporal) and every block adds its own learned tables; LayerNorms without affine;
- a fixed 2D sin-cos table on the video tokens (PixArt base-size trick), none on the text tokens;
- the caption projection MLP and a fixed random null-caption buffer for caption dropout / classifier-free guidance;
- ``learn_sigma=True`` doubles the output channels (epsilon + learned-range variance, the paper's IDDPM objective).

One documented difference: the last block has no text FFN. In the official code its output is computed and discarded
(nothing reads the text stream after the last block), which leaves unused parameters under DDP; the video output is
identical without it.

Tests: tests/mvdit/test_mvdit_model.py (round trip, every-parameter gradient, temporal mixing gradient test,
text-mask and null-caption behaviour, gradient checkpointing equivalence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.embeddings import (
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    Timesteps,
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from genvis.layers import GELUMLP, Attention, PatchEmbed, modulate, unpatchify

__all__ = ["MVDIT_PRESETS", "MVDiTBlock", "MVDiTTransformer3DModel", "MVDiTTransformer3DModelOutput"]


@dataclass
class MVDiTTransformer3DModelOutput(BaseOutput):
    """Output of :class:`MVDiTTransformer3DModel`.

    Args:
        sample: ``(B, out_channels, T, H, W)``; with ``learn_sigma`` the first ``in_channels`` channels are the predicted
            noise (or velocity) and the rest the variance interpolation values in [-1, 1] (IDDPM "learned range").
    """

    sample: torch.Tensor


def _sincos_time_embedding(num_frames: int, dim: int, time_scale: float, device: torch.device) -> torch.Tensor:
    """``(T, dim)`` fixed 1D sin-cos embedding of the frame index divided by ``time_scale`` (Open-Sora 1.0)."""
    positions = torch.arange(num_frames, device=device, dtype=torch.float32) / time_scale
    return get_1d_sincos_pos_embed_from_grid(dim, positions, output_type="pt").float()


class MVDiTBlock(nn.Module):
    """One MVDiT block: MMSA (per frame), MMTA (across frames), MHCA (video -> text), per-stream FFNs.

    Args:
        dim: model width ``D``.
        num_attention_heads: heads of every attention.
        attention_head_dim: per-head width (``num_attention_heads * attention_head_dim == dim``).
        mlp_ratio: FFN inner width over ``dim``.
        norm_eps: LayerNorm epsilon.
        text_ffn: whether the text stream has an FFN (False in the last block, whose text output nobody reads).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        text_ffn: bool = True,
    ) -> None:
        super().__init__()
        # parameter-free LayerNorms: the affine part comes from adaLN (shared by both streams and both positions)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)

        def attention() -> Attention:
            # OpenVid: qkv Linear with bias, output Linear with bias, no QK-norm
            return Attention(dim, num_attention_heads, head_dim=attention_head_dim, qk_norm=None, bias=True)

        self.attn = attention()  # MMSA, one set of weights for video and text tokens
        self.temporal_attn = attention()  # MMTA, shared too
        self.cross_attn = attention()  # MHCA, video queries, text keys/values
        hidden = int(dim * mlp_ratio)
        self.ff = GELUMLP(dim, hidden, approximate="tanh")
        self.ff_text = GELUMLP(dim, hidden, approximate="tanh") if text_ffn else None
        # adaLN-single tables (PixArt): added to the global timestep projections; filled by the model's init
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        self.scale_shift_table_text = nn.Parameter(torch.zeros(6, dim))
        self.scale_shift_table_temporal = nn.Parameter(torch.zeros(3, dim))
        self.scale_shift_table_text_temporal = nn.Parameter(torch.zeros(3, dim))

    @staticmethod
    def _chunks(table: nn.Parameter, projected: torch.Tensor) -> list[torch.Tensor]:
        """``table (n, D) + projected (B, n, D)`` -> n tensors ``(B, 1, 1, D)`` broadcasting over (frame, token)."""
        return [chunk[:, None, None, :] for chunk in (table[None] + projected).unbind(1)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_proj: torch.Tensor,
        timestep_proj_text: torch.Tensor,
        timestep_proj_temporal: torch.Tensor,
        timestep_proj_text_temporal: torch.Tensor,
        frame_attention_mask: torch.Tensor | None,
        text_attention_mask: torch.Tensor | None,
        temporal_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
        hidden_states: video tokens ``(B, T, S, D)``.
        encoder_hidden_states: text tokens ``(B, T, L, D)`` (one copy per frame).
        timestep_proj: ``(B, 6, D)`` global video modulation; ``timestep_proj_text`` the same for text.
        timestep_proj_temporal: ``(B, 3, D)`` for the temporal attention; ``timestep_proj_text_temporal`` for text.
        frame_attention_mask: ``(B*T, S+L)`` bool key mask of the per-frame joint sequence, or None (no padding).
        text_attention_mask: ``(B*T, L)`` bool key mask of the text tokens, or None.
        temporal_embedding: ``(T, D)`` time embedding added to the temporal attention input (block 0 only).
        """
        B, T, S, D = hidden_states.shape
        L = encoder_hidden_states.shape[2]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._chunks(
            self.scale_shift_table, timestep_proj
        )
        y_shift_msa, y_scale_msa, y_gate_msa, y_shift_mlp, y_scale_mlp, y_gate_mlp = self._chunks(
            self.scale_shift_table_text, timestep_proj_text
        )
        shift_tmp, scale_tmp, gate_tmp = self._chunks(self.scale_shift_table_temporal, timestep_proj_temporal)
        y_shift_tmp, y_scale_tmp, y_gate_tmp = self._chunks(
            self.scale_shift_table_text_temporal, timestep_proj_text_temporal
        )

        # 1. MMSA: per frame, one attention over [video ; text] with shared weights
        joint = torch.cat(
            [
                modulate(self.norm1(hidden_states), scale_msa, shift_msa),
                modulate(self.norm1(encoder_hidden_states), y_scale_msa, y_shift_msa),
            ],
            dim=2,
        )  # (B, T, S+L, D)
        joint = self.attn(joint.reshape(B * T, S + L, D), attn_mask=frame_attention_mask).reshape(B, T, S + L, D)
        hidden_states = hidden_states + gate_msa * joint[:, :, :S]
        encoder_hidden_states = encoder_hidden_states + y_gate_msa * joint[:, :, S:]

        # 2. MMTA: for every video position and text slot, attend across the T frames
        joint = torch.cat(
            [
                modulate(self.norm1(hidden_states), scale_tmp, shift_tmp),
                modulate(self.norm1(encoder_hidden_states), y_scale_tmp, y_shift_tmp),
            ],
            dim=2,
        )  # (B, T, S+L, D)
        if temporal_embedding is not None:
            joint = joint + temporal_embedding[None, :, None, :].to(joint.dtype)
        joint = joint.transpose(1, 2).reshape(B * (S + L), T, D)  # (B*(S+L), T, D)
        joint = self.temporal_attn(joint).reshape(B, S + L, T, D).transpose(1, 2)  # (B, T, S+L, D)
        hidden_states = hidden_states + gate_tmp * joint[:, :, :S]
        encoder_hidden_states = encoder_hidden_states + y_gate_tmp * joint[:, :, S:]

        # 3. MHCA: raw video tokens (no norm, no gate) attend to the current text tokens of their frame
        cross = self.cross_attn(
            hidden_states.reshape(B * T, S, D),
            encoder_hidden_states.reshape(B * T, L, D),
            attn_mask=text_attention_mask,
        )
        hidden_states = hidden_states + cross.reshape(B, T, S, D)

        # 4. per-stream FFNs with gated residuals
        hidden_states = hidden_states + gate_mlp * self.ff(modulate(self.norm2(hidden_states), scale_mlp, shift_mlp))
        if self.ff_text is not None:
            encoder_hidden_states = encoder_hidden_states + y_gate_mlp * self.ff_text(
                modulate(self.norm2(encoder_hidden_states), y_scale_mlp, y_shift_mlp)
            )
        return hidden_states, encoder_hidden_states


class MVDiTTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """MVDiT denoiser over video latents ``(B, C, T, H, W)`` conditioned on text-encoder hidden states.

    Args:
        in_channels: latent channels ``C``.
        out_channels: output channels; None means ``2 * in_channels`` with ``learn_sigma`` and ``in_channels`` without.
        learn_sigma: predict the IDDPM variance interpolation values next to the noise (the paper's objective).
        patch_size: ``(pt, ph, pw)`` patch over (time, height, width); OpenVid uses ``(1, 2, 2)``.
        num_layers: number of blocks.
        num_attention_heads: heads per attention.
        attention_head_dim: per-head width; the model width is ``num_attention_heads * attention_head_dim``.
        mlp_ratio: FFN inner width over the model width.
        text_embed_dim: width of the text encoder's hidden states.
        max_text_length: text tokens the null caption covers (the text encoder pads to this length).
        sample_size: latent height/width the 2D position table is calibrated for (PixArt base size).
        interpolation_scale: positions are divided by this at ``sample_size`` (OpenVid's ``space_scale``).
        time_scale: frame indices are divided by this in the temporal embedding.
        freq_dim: sinusoidal width of the timestep embedding.
        norm_eps: LayerNorm epsilon.
        frame_embedding: genvis option, off in the paper's model: every video token also gets its frame's sin-cos
            time embedding through a zero-initialised linear, so the per-frame streams (MMSA, MHCA, FFN) know which
            frame they are in; in the paper's model only block 0's temporal attention input sees the frame index.
            At initialisation the output is the paper model's.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["MVDiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        learn_sigma: bool = True,
        patch_size: tuple[int, int, int] | list[int] = (1, 2, 2),
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        text_embed_dim: int = 4096,
        max_text_length: int = 120,
        sample_size: int = 64,
        interpolation_scale: float = 1.0,
        time_scale: float = 1.0,
        freq_dim: int = 256,
        norm_eps: float = 1e-6,
        frame_embedding: bool = False,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size: expected 3 positive ints (pt, ph, pw), got {patch_size}")
        for name, value in (
            ("in_channels", in_channels),
            ("num_layers", num_layers),
            ("num_attention_heads", num_attention_heads),
            ("text_embed_dim", text_embed_dim),
            ("max_text_length", max_text_length),
            ("sample_size", sample_size),
        ):
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        dim = num_attention_heads * attention_head_dim
        if dim % 4 != 0:
            # the 2D sin-cos table gives dim/2 to each axis, each of which needs an even width
            raise ValueError(
                f"num_attention_heads * attention_head_dim must be divisible by 4 for the 2D sin-cos table, got {dim}"
            )
        if interpolation_scale <= 0 or time_scale <= 0:
            raise ValueError(
                f"interpolation_scale and time_scale must be > 0, got {interpolation_scale} and {time_scale}"
            )
        expected_out = in_channels * (2 if learn_sigma else 1)
        if out_channels is not None and out_channels != expected_out:
            raise ValueError(
                f"out_channels: expected {expected_out} (in_channels={in_channels}, learn_sigma={learn_sigma}) or "
                f"None, got {out_channels}"
            )
        self.out_channels = expected_out
        self.inner_dim = dim
        self.gradient_checkpointing = False

        # embeddings: patches, timestep (sinusoidal -> MLP), adaLN-single projections, caption projection
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.frame_embedder: nn.Linear | None = None  # genvis option, made after the paper's init (below)
        self.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(freq_dim, dim)
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.time_modulation_text = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.time_modulation_temporal = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.time_modulation_text_temporal = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.caption_projection = PixArtAlphaTextProjection(text_embed_dim, dim, act_fn="gelu_tanh")
        # fixed random null caption (not trained, saved with the weights) used for dropped captions and CFG
        self.register_buffer("null_text_embedding", torch.zeros(max_text_length, text_embed_dim), persistent=True)

        self.blocks = nn.ModuleList(
            [
                MVDiTBlock(
                    dim,
                    num_attention_heads,
                    attention_head_dim,
                    mlp_ratio=mlp_ratio,
                    norm_eps=norm_eps,
                    text_ffn=index < num_layers - 1,
                )
                for index in range(num_layers)
            ]
        )

        # PixArt "T2IFinalLayer": LayerNorm + (shift, scale) from a table plus the timestep embedding, then Linear
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.proj_out = nn.Linear(dim, math.prod(patch_size) * self.out_channels)
        self.initialize_weights()
        if frame_embedding:  # drawing no random numbers: a same-seed model has the paper model's weights
            with torch.random.fork_rng(devices=[]):
                self.frame_embedder = nn.Linear(dim, dim)
            nn.init.zeros_(self.frame_embedder.weight)
            nn.init.zeros_(self.frame_embedder.bias)

    def initialize_weights(self) -> None:
        """Every init rule in one place (PixArt-alpha / OpenVid)."""
        dim = self.inner_dim

        # xavier-uniform Linears with zero biases (DiT/PixArt basic init)
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        # patch embedding initialised like a Linear over the flattened kernel
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(dim, -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        # timestep MLP, global adaLN projections and caption projection: N(0, 0.02) as PixArt
        for linear in (
            self.time_embedding.linear_1,
            self.time_embedding.linear_2,
            self.time_modulation[1],
            self.time_modulation_text[1],
            self.time_modulation_temporal[1],
            self.time_modulation_text_temporal[1],
            self.caption_projection.linear_1,
            self.caption_projection.linear_2,
        ):
            nn.init.normal_(linear.weight, std=0.02)
        # per-block adaLN tables ~ N(0, 1/D) (PixArt's randn / sqrt(D)); they are not zero, so MMSA and the FFNs are
        # active from the first step, as in the image model MVDiT is initialised from
        std = dim**-0.5
        for block in self.blocks:
            for table in (
                block.scale_shift_table,
                block.scale_shift_table_text,
                block.scale_shift_table_temporal,
                block.scale_shift_table_text_temporal,
            ):
                nn.init.normal_(table, std=std)
            # zero-init the temporal and cross-attention outputs: the model starts as a per-frame image model
            # without text injection into the video stream, so new branches cannot disturb it at step 0
            for linear in (block.temporal_attn.to_out, block.cross_attn.to_out):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.scale_shift_table, std=std)
        # zero output head: the first prediction is 0 everywhere (DiT), a stable start for any objective
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        if self.frame_embedder is not None:  # genvis option: zero, so the model starts as the paper's
            nn.init.zeros_(self.frame_embedder.weight)
            nn.init.zeros_(self.frame_embedder.bias)
        # null caption ~ N(0, 1) / sqrt(text_embed_dim): the scale of a typical normalised text feature (1/64 for T5-XXL)
        generator = torch.Generator().manual_seed(0)
        null = torch.randn(self.null_text_embedding.shape, generator=generator) / self.config.text_embed_dim**0.5
        self.null_text_embedding.copy_(null.to(self.null_text_embedding))

    def apply_caption_dropout(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        drop_text: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the captions of the rows where ``drop_text`` is True by the null caption (all its tokens visible).

        Args:
            encoder_hidden_states: ``(B, L, text_embed_dim)`` text features.
            encoder_attention_mask: ``(B, L)`` (1 = real token) or None.
            drop_text: ``(B,)`` bool.

        Returns:
            The new ``(hidden states, bool mask)``.
        """
        B, L, _ = encoder_hidden_states.shape
        if drop_text.shape != (B,):
            raise ValueError(f"drop_text: expected shape ({B},), got {tuple(drop_text.shape)}")
        null = self.null_text_embedding[:L].to(encoder_hidden_states.dtype)  # (L, C)
        rows = drop_text.to(torch.bool)[:, None]  # (B, 1)
        hidden = torch.where(rows[:, :, None], null[None], encoder_hidden_states)
        mask = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
        if encoder_attention_mask is not None:
            mask = torch.where(rows, mask, encoder_attention_mask.to(torch.bool))
        return hidden, mask

    def _check_inputs(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        if hidden_states.ndim != 5 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states: expected (B, {self.config.in_channels}, T, H, W), got {tuple(hidden_states.shape)}"
            )
        pt, ph, pw = self.config.patch_size
        _, _, T, H, W = hidden_states.shape
        if T % pt or H % ph or W % pw:
            raise ValueError(f"hidden_states: (T, H, W) = {(T, H, W)} must be divisible by patch_size {(pt, ph, pw)}")
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != hidden_states.shape[0]
            or encoder_hidden_states.shape[2] != self.config.text_embed_dim
        ):
            raise ValueError(
                f"encoder_hidden_states: expected ({hidden_states.shape[0]}, L, {self.config.text_embed_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[1] > self.config.max_text_length:
            raise ValueError(
                f"encoder_hidden_states: at most max_text_length={self.config.max_text_length} tokens, "
                f"got {encoder_hidden_states.shape[1]}"
            )
        if mask is not None and mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(
                f"encoder_attention_mask: expected shape {tuple(encoder_hidden_states.shape[:2])}, got {tuple(mask.shape)}"
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_attention_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> MVDiTTransformer3DModelOutput | tuple[torch.Tensor]:
        """Predict the noise (and variance values) or velocity for noisy video latents.

        Args:
            hidden_states: noisy latents ``(B, C, T, H, W)``.
            encoder_hidden_states: text-encoder hidden states ``(B, L, text_embed_dim)``, ``L <= max_text_length``.
            timestep: ``(B,)`` or scalar diffusion timestep (DDPM step index, or ``1000 * sigma`` for flow matching).
            encoder_attention_mask: ``(B, L)`` 1/True for real tokens, 0/False for padding; None = all real.
            drop_text: ``(B,)`` bool: rows whose caption is replaced by the null caption (caption dropout, CFG).
            return_dict: return :class:`MVDiTTransformer3DModelOutput` instead of a tuple.

        Returns:
            ``sample`` of shape ``(B, out_channels, T, H, W)``.
        """
        self._check_inputs(hidden_states, encoder_hidden_states, encoder_attention_mask)
        B = hidden_states.shape[0]
        dtype = hidden_states.dtype
        if drop_text is not None:
            encoder_hidden_states, encoder_attention_mask = self.apply_caption_dropout(
                encoder_hidden_states, encoder_attention_mask, drop_text
            )

        # 1. video tokens + fixed 2D sin-cos positions (PixArt base-size trick: positions span the same range as at
        # sample_size whatever the resolution)
        tokens, grid = self.patch_embed(hidden_states)  # (B, T*h*w, D), grid (T, h, w)
        T, h, w = grid
        S, D = h * w, self.inner_dim
        base_size = self.config.sample_size // self.config.patch_size[1]
        pos = get_2d_sincos_pos_embed(
            D, (h, w), base_size=base_size, interpolation_scale=self.config.interpolation_scale, device=tokens.device
        )  # (h*w, D)
        tokens = tokens.reshape(B, T, S, D) + pos.to(dtype)[None, None]  # (B, T, S, D)

        # 2. timestep embedding and the four adaLN-single projections
        timestep = torch.as_tensor(timestep, device=tokens.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.shape != (B,):
            raise ValueError(f"timestep: expected a scalar or shape ({B},), got {tuple(timestep.shape)}")
        temb = self.time_embedding(self.time_proj(timestep).to(dtype))  # (B, D)
        proj = self.time_modulation(temb).unflatten(1, (6, D))  # (B, 6, D)
        proj_text = self.time_modulation_text(temb).unflatten(1, (6, D))
        proj_temporal = self.time_modulation_temporal(temb).unflatten(1, (3, D))  # (B, 3, D)
        proj_text_temporal = self.time_modulation_text_temporal(temb).unflatten(1, (3, D))

        # 3. text tokens, one copy per frame, and the attention masks
        text = self.caption_projection(encoder_hidden_states.to(dtype))  # (B, L, D)
        L = text.shape[1]
        text = text[:, None].expand(B, T, L, D)  # (B, T, L, D)
        frame_mask = text_mask = None
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            text_mask = encoder_attention_mask.to(torch.bool).repeat_interleave(T, dim=0)  # (B*T, L)
            video_keys = torch.ones(B * T, S, dtype=torch.bool, device=text_mask.device)
            frame_mask = torch.cat([video_keys, text_mask], dim=1)  # (B*T, S+L)
        temporal_embedding = _sincos_time_embedding(T, D, self.config.time_scale, tokens.device)  # (T, D)
        if self.frame_embedder is not None:
            tokens = tokens + self.frame_embedder(temporal_embedding.to(dtype))[None, :, None, :]

        # 4. blocks
        for index, block in enumerate(self.blocks):
            args = (
                tokens,
                text,
                proj,
                proj_text,
                proj_temporal,
                proj_text_temporal,
                frame_mask,
                text_mask,
                temporal_embedding if index == 0 else None,
            )
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens, text = self._gradient_checkpointing_func(block, *args)
            else:
                tokens, text = block(*args)

        # 5. final layer (video stream only) and unpatchify
        shift, scale = (self.scale_shift_table[None] + temb[:, None]).unbind(1)  # (B, D) each
        tokens = modulate(self.norm_out(tokens), scale[:, None, None], shift[:, None, None])
        tokens = self.proj_out(tokens).reshape(B, T * S, -1)  # (B, T*h*w, C_out*pt*ph*pw)
        sample = unpatchify(tokens, grid, self.config.patch_size, self.out_channels)  # (B, C_out, T_in, H_in, W_in)
        if not return_dict:
            return (sample,)
        return MVDiTTransformer3DModelOutput(sample=sample)


# Size presets. "XL" is MVDiT-XL/2 of the paper and the released 16x512x512 weights (depth 28, width 1152,
# 16 heads, T5-XXL text, 4-channel SD-VAE latents of 512 px); "tiny" is the CPU/CI size (MiniLM text, 32 px frames
# through an 8x VAE).
MVDIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "in_channels": 4,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "text_embed_dim": 384,
        "max_text_length": 32,
        "sample_size": 4,
    },
    "XL": {
        "in_channels": 4,
        "num_layers": 28,
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "text_embed_dim": 4096,
        "max_text_length": 120,
        "sample_size": 64,
        "interpolation_scale": 1.0,
    },
}
