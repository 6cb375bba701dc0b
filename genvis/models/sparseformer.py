"""SparseFormer bootstrapped from a genvis ViT (Gao et al., ICLR 2024 and CVPR 2024 "Bootstrapping SparseFormers").

A fixed set of ``num_latent_tokens`` latent tokens, each with a region of interest (RoI) ``(cx, cy, w, h)`` in [0, 1],
looks at the image only through sparse bilinear sampling:

1. **Feature map** (inherited, frozen): the teacher's patch embedding plus its learned position grid, as a
   ``(B, D, h, w)`` map, i.e. exactly the teacher's input tokens laid out spatially.
2. **Focusing transformer** (trainable, light): one unit repeated ``num_focus_repeats`` times with shared weights and a
   learned stage embedding. Ops in the bootstrapping order ``[SAMPLING_M, PE_INJECT, ATTN, MLP, ROI_ADJ]``:
   ``num_sampling_points`` points per token (base grid + zero-init offsets, normalised to ``(o - mean) / (3 std)``
   and scaled into the RoI), adaptive mixing (AdaMixer-style per-token channel and point mixing), a sinusoidal RoI
   code, a pre-norm attention/MLP block among the latent tokens, and a zero-init RoI update
   ``centre += d_xy * wh; wh *= exp(d_wh)``.
3. **Transition**: the teacher's input token at each final RoI centre (bilinear, so it carries the inherited position
   code) plus a zero-init Linear of the focusing token, then one more sampling + mixing at the teacher width (zero-init
   output). At init the cortex therefore sees a regular grid of real teacher tokens; training improves on that.
4. **Cortex** (inherited): the teacher's last ``num_cortex_layers`` blocks (default 2/3 of its depth), its CLS token and
   final norm; frozen except the first ``trainable_cortex_layers`` blocks. A trainable identity-init ``align_proj``
   maps the normed CLS into the teacher's representation space.

``SparseFormerModel.from_vit(teacher)`` copies the weights; the training objective (``sparseformer_alignment_loss``,
``1 - cos`` on the pooled output, no labels) is driven by ``train/sparseformer.py``. Tests:
tests/consumers/test_sparseformer.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from genvis.encoders.vit import MlpType, NormType, VisionTransformerBlock, VisionTransformerModel, _make_norm

__all__ = [
    "SparseFormerModel",
    "SparseFormerOutput",
    "initial_rois",
    "roi_sampling_points",
    "sparseformer_alignment_loss",
    "token_subset_baseline",
]


@dataclass
class SparseFormerOutput(BaseOutput):
    """Named outputs of :class:`SparseFormerModel`.

    Args:
        pooler_output: ``(B, D)`` aligned CLS embedding (compare with the teacher's ``pooler_output``).
        latent_tokens: ``(B, N, D)`` latent tokens after the cortex and final norm.
        rois: ``(B, N, 4)`` final RoIs ``(cx, cy, w, h)`` in [0, 1] image coordinates (fp32).
        sampling_points: ``(B, N, P, 2)`` ``(x, y)`` in [0, 1] of the last sampling step.
    """

    pooler_output: torch.Tensor = None
    latent_tokens: torch.Tensor = None
    rois: torch.Tensor = None
    sampling_points: torch.Tensor = None


def initial_rois(num_tokens: int) -> torch.Tensor:
    """``(N, 4)`` RoIs tiling the image on a ``ceil(sqrt(N))`` grid (row-major, first ``N`` cells), side = one cell."""
    side = math.ceil(math.sqrt(num_tokens))
    index = torch.arange(num_tokens)
    cx, cy = (index % side + 0.5) / side, (index // side + 0.5) / side
    wh = torch.full((num_tokens,), 1.0 / side)
    return torch.stack([cx, cy, wh, wh], dim=-1)


def roi_sampling_points(rois: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Place raw point offsets inside each RoI.

    Offsets are normalised per token and axis as ``(o - mean) / (3 std)``, clamped to [-1, 1] and scaled by half the
    RoI size around its centre, so every point lies inside its RoI.

    Args:
        rois: ``(B, N, 4)`` ``(cx, cy, w, h)``.
        offsets: ``(B, N, P, 2)`` raw offsets.

    Returns:
        ``(B, N, P, 2)`` ``(x, y)`` points in image coordinates.
    """
    mean = offsets.mean(dim=2, keepdim=True)
    std = offsets.std(dim=2, keepdim=True) if offsets.shape[2] > 1 else torch.ones_like(mean)
    normalised = ((offsets - mean) / (3 * std + 1e-6)).clamp(-1.0, 1.0)
    return rois[:, :, None, :2] + normalised * rois[:, :, None, 2:] / 2


def _sample(feature_map: torch.Tensor, points: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Bilinear sampling: ``(B, C, h, w)`` map at ``(B, N, P, 2)`` points in [0, 1] -> ``(B, N, P, C)``."""
    grid = points.to(feature_map.dtype) * 2 - 1  # grid_sample's [-1, 1] (align_corners=False: pixel edges)
    sampled = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return sampled.permute(0, 2, 3, 1)  # (B, N, P, C)


def _roi_code(rois: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal code of the 4 RoI coordinates (temperatures log-spaced up to 128, times pi): ``(B, N, dim)``."""
    freqs_per_coord = dim // 8
    freqs = torch.logspace(0, math.log10(128.0), freqs_per_coord, device=rois.device, dtype=torch.float32) * math.pi
    angles = rois.float()[..., None] * freqs  # (B, N, 4, F)
    code = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, N, 8F)
    return F.pad(code, (0, dim - code.shape[-1]))


class AdaptiveMixing(nn.Module):
    """AdaMixer-style decoding of sampled points into a token.

    Per token, a generator produces a ``C x C`` channel-mixing and a ``P_out x P`` point-mixing matrix from the token
    itself; sampled features are channel-mixed, point-mixed (each followed by LayerNorm + GELU), flattened and projected
    into the token width.

    Args:
        token_dim: latent token width.
        feature_dim: width of the sampled feature map.
        mixing_dim: channel width ``C`` inside the mixer.
        num_points: sampled points ``P`` per token.
        num_out_points: mixed points ``P_out``.
    """

    def __init__(
        self, token_dim: int, feature_dim: int, mixing_dim: int, num_points: int, num_out_points: int
    ) -> None:
        super().__init__()
        self.mixing_dim, self.num_points, self.num_out_points = mixing_dim, num_points, num_out_points
        self.in_proj = nn.Linear(feature_dim, mixing_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.generator = nn.Linear(token_dim, mixing_dim * mixing_dim + num_out_points * num_points)
        self.norm_channel = nn.LayerNorm(mixing_dim)
        self.norm_point = nn.LayerNorm(mixing_dim)
        self.out_proj = nn.Linear(num_out_points * mixing_dim, token_dim)

    def forward(self, tokens: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, N, Dt)``, ``sampled`` ``(B, N, P, Df)`` -> update ``(B, N, Dt)``."""
        c, p, q = self.mixing_dim, self.num_points, self.num_out_points
        params = self.generator(self.norm(tokens))
        channel_mix = params[..., : c * c].unflatten(-1, (c, c))  # (B, N, C, C)
        point_mix = params[..., c * c :].unflatten(-1, (q, p))  # (B, N, P_out, P)
        x = self.in_proj(sampled)  # (B, N, P, C)
        x = F.gelu(self.norm_channel(x @ channel_mix))
        x = F.gelu(self.norm_point(point_mix @ x))  # (B, N, P_out, C)
        return self.out_proj(x.flatten(-2))


class FocusingUnit(nn.Module):
    """One focusing-transformer unit: sampling + adaptive mixing, RoI code, attention/MLP block, RoI adjustment.

    Args:
        dim: latent token width.
        feature_dim: sampled feature-map width.
        num_heads: attention heads among the latent tokens.
        num_points: sampling points per token.
        mixing_dim: adaptive-mixing channel width.
        num_out_points: adaptive-mixing output points.
        padding_mode: ``grid_sample`` padding (``"border"`` as in the bootstrapped release, or ``"zeros"``).
        with_block: include the attention/MLP block and the RoI adjustment (False: sampling + RoI code only).
    """

    def __init__(
        self,
        dim: int,
        feature_dim: int,
        num_heads: int,
        num_points: int,
        mixing_dim: int,
        num_out_points: int,
        padding_mode: str,
        with_block: bool = True,
    ) -> None:
        super().__init__()
        self.padding_mode = padding_mode
        side = math.ceil(math.sqrt(num_points))
        lin = torch.linspace(-1.0, 1.0, side)
        base = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), dim=-1).reshape(-1, 2)[:num_points]
        self.base_points = nn.Parameter(base.clone())  # (P, 2), learned
        self.offset_norm = nn.LayerNorm(dim)
        self.offset = nn.Linear(dim, num_points * 2)
        self.mixing = AdaptiveMixing(dim, feature_dim, mixing_dim, num_points, num_out_points)
        self.pe_norm = nn.LayerNorm(dim)
        self.pe_proj = nn.Linear(dim, dim)
        if with_block:
            self.block = VisionTransformerBlock(
                dim,
                num_heads,
                head_dim=dim // num_heads,
                mlp_hidden_dim=4 * dim,
                mlp_type="gelu",
                mlp_bias=True,
                qkv_bias=True,
                norm_type="layer",
                norm_eps=1e-6,
                layer_scale_init_value=None,
            )
            self.roi_norm = nn.LayerNorm(dim)
            self.roi_adjust = nn.Linear(dim, 4)
        else:
            self.block = self.roi_norm = self.roi_adjust = None

    def forward(
        self, tokens: torch.Tensor, rois: torch.Tensor, feature_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens`` ``(B, N, D)``, ``rois`` ``(B, N, 4)`` fp32, ``feature_map`` ``(B, Df, h, w)``."""
        offsets = self.base_points + self.offset(self.offset_norm(tokens)).unflatten(-1, (-1, 2))  # (B, N, P, 2)
        points = roi_sampling_points(rois, offsets.float())
        tokens = tokens + self.mixing(tokens, _sample(feature_map, points, self.padding_mode))
        tokens = tokens + self.pe_proj(self.pe_norm(_roi_code(rois, tokens.shape[-1]).to(tokens.dtype)))
        if self.block is not None:
            tokens = self.block(tokens)
            delta = self.roi_adjust(self.roi_norm(tokens)).float()  # (B, N, 4), zero at init
            centre = rois[..., :2] + delta[..., :2] * rois[..., 2:]
            size = rois[..., 2:] * torch.exp(delta[..., 2:].clamp(max=4.0))
            rois = torch.cat([centre, size.clamp(min=1e-3, max=2.0)], dim=-1)
        return tokens, rois, points


class SparseFormerModel(ModelMixin, ConfigMixin):
    """SparseFormer whose cortex is inherited from a genvis ViT; build it with :meth:`from_vit`.

    Args:
        in_channels: image channels (teacher).
        patch_size: teacher patch side; the sampled feature map has stride ``patch_size``.
        patch_bias: bias on the teacher patch projection.
        num_attention_heads: teacher heads.
        attention_head_dim: teacher width per head (cortex width ``D = heads * head_dim``).
        mlp_hidden_dim: teacher MLP inner width.
        mlp_type: teacher MLP family.
        mlp_bias: teacher MLP biases.
        qkv_bias: teacher q/k/v biases.
        norm_type: teacher norm family.
        norm_eps: teacher norm epsilon.
        layer_scale_init_value: teacher LayerScale (None for none).
        pos_embed_grid_size: ``[h, w]`` of the teacher's learned position grid.
        pos_embed_cls: the teacher's position table has a leading CLS row.
        num_cortex_layers: inherited teacher blocks (the teacher's last ones).
        trainable_cortex_layers: how many of the first cortex blocks stay trainable (0: all frozen).
        num_latent_tokens: latent tokens ``N`` (49 in SparseFormer-T and the bootstrapped release).
        focus_dim: focusing-transformer width.
        focus_num_heads: focusing attention heads.
        num_focus_repeats: repeats of the shared focusing unit.
        num_sampling_points: sampling points ``P`` per token and step.
        mixing_dim: adaptive-mixing channel width.
        mixing_out_points: adaptive-mixing output points.
        padding_mode: ``grid_sample`` padding, ``"border"`` or ``"zeros"``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 4,
        patch_bias: bool = True,
        num_attention_heads: int = 2,
        attention_head_dim: int = 32,
        mlp_hidden_dim: int = 128,
        mlp_type: MlpType = "gelu",
        mlp_bias: bool = True,
        qkv_bias: bool = True,
        norm_type: NormType = "layer",
        norm_eps: float = 1e-6,
        layer_scale_init_value: float | None = None,
        pos_embed_grid_size: list[int] | None = None,
        pos_embed_cls: bool = True,
        num_cortex_layers: int = 2,
        trainable_cortex_layers: int = 0,
        num_latent_tokens: int = 49,
        focus_dim: int = 16,
        focus_num_heads: int = 2,
        num_focus_repeats: int = 2,
        num_sampling_points: int = 9,
        mixing_dim: int = 8,
        mixing_out_points: int = 4,
        padding_mode: str = "border",
    ) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        pos_embed_grid_size = list(pos_embed_grid_size or [16, 16])
        checks = {
            "num_latent_tokens": num_latent_tokens,
            "num_focus_repeats": num_focus_repeats,
            "num_sampling_points": num_sampling_points,
            "mixing_out_points": mixing_out_points,
            "focus_dim": focus_dim,
        }
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if focus_dim % focus_num_heads:
            raise ValueError(f"focus_dim ({focus_dim}) must be divisible by focus_num_heads ({focus_num_heads})")
        if not 0 <= trainable_cortex_layers <= num_cortex_layers:
            raise ValueError(
                f"trainable_cortex_layers must be in [0, num_cortex_layers={num_cortex_layers}], got "
                f"{trainable_cortex_layers}"
            )
        if padding_mode not in ("border", "zeros"):
            raise ValueError(f"padding_mode must be 'border' or 'zeros', got {padding_mode!r}")
        if len(pos_embed_grid_size) != 2 or min(pos_embed_grid_size) < 1:
            raise ValueError(f"pos_embed_grid_size must be [h, w], got {pos_embed_grid_size}")
        self.dim = dim

        # 1. inherited input embedding (frozen): the teacher's patch projection, position grid and CLS token
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=patch_bias)
        grid_h, grid_w = pos_embed_grid_size
        self.pos_embed = nn.Parameter(torch.zeros(grid_h * grid_w + int(pos_embed_cls), dim))
        self.cls_token = nn.Parameter(torch.zeros(1, dim))

        # 2. focusing transformer (trainable)
        self.latent_embed = nn.Parameter(torch.zeros(num_latent_tokens, focus_dim))
        self.roi_embed = nn.Parameter(initial_rois(num_latent_tokens))  # (N, 4) learned initial RoIs
        self.stage_embed = nn.Parameter(torch.zeros(num_focus_repeats, focus_dim))
        self.focus = FocusingUnit(
            focus_dim, dim, focus_num_heads, num_sampling_points, mixing_dim, mixing_out_points, padding_mode
        )
        self.transition = nn.Linear(focus_dim, dim)
        self.cortex_sampling = FocusingUnit(
            dim, dim, num_attention_heads, num_sampling_points, mixing_dim, mixing_out_points, padding_mode, False
        )

        # 3. cortex: inherited blocks + final norm, and a trainable identity-init alignment projection
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
                for _ in range(num_cortex_layers)
            ]
        )
        self.norm = _make_norm(norm_type, dim, norm_eps)
        self.align_proj = nn.Linear(dim, dim)
        self.initialize_weights()
        self.freeze_inherited()

    def initialize_weights(self) -> None:
        """All init in one place: truncated-normal(0.02) linears/tokens, zero-init sampling offsets and RoI deltas,
        zero stage embeddings, identity ``align_proj`` (inherited weights are overwritten by :meth:`from_vit`)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for token in (self.latent_embed, self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(token, std=0.02)
        nn.init.zeros_(self.stage_embed)
        for unit in (self.focus, self.cortex_sampling):
            nn.init.zeros_(unit.offset.weight)
            nn.init.zeros_(unit.offset.bias)
        for zero_init in (self.transition, self.cortex_sampling.mixing.out_proj, self.cortex_sampling.pe_proj):
            nn.init.zeros_(zero_init.weight)
            nn.init.zeros_(zero_init.bias)
        nn.init.zeros_(self.focus.roi_adjust.weight)
        nn.init.zeros_(self.focus.roi_adjust.bias)
        with torch.no_grad():
            self.align_proj.weight.copy_(torch.eye(self.dim))
            self.align_proj.bias.zero_()

    def inherited_parameter_names(self) -> list[str]:
        """Names of the parameters copied from the teacher (frozen unless in a trainable cortex block)."""
        prefixes = ("patch_embed.", "pos_embed", "cls_token", "blocks.", "norm.")
        return [name for name, _ in self.named_parameters() if name.startswith(prefixes)]

    def freeze_inherited(self) -> None:
        """Freeze the inherited parameters except the first ``trainable_cortex_layers`` cortex blocks."""
        unlocked = tuple(f"blocks.{i}." for i in range(self.config.trainable_cortex_layers))
        inherited = set(self.inherited_parameter_names())
        for name, param in self.named_parameters():
            if name in inherited:
                param.requires_grad_(name.startswith(unlocked))

    @classmethod
    def from_vit(
        cls,
        teacher: VisionTransformerModel,
        num_latent_tokens: int = 49,
        num_cortex_layers: int | None = None,
        **kwargs,
    ) -> SparseFormerModel:
        """Bootstrap from a genvis ViT: copy its patch embedding, position grid, CLS, last blocks and final norm.

        Args:
            teacher: a :class:`VisionTransformerModel` with learned positions, a CLS token, CLS pooling and
                ``final_norm="all"``, images only (``temporal_patch_size=1``), no registers or window attention.
            num_latent_tokens: latent tokens.
            num_cortex_layers: inherited (last) teacher blocks; default ``round(2/3 * depth)`` (the released recipe).
            **kwargs: other :class:`SparseFormerModel` config fields (focusing sizes, ``trainable_cortex_layers``...).
        """
        config = teacher.config
        expected = {
            "position_embedding_type": "learned",
            "use_cls_token": True,
            "pooling_type": "cls",
            "final_norm": "all",
            "temporal_patch_size": 1,
            "num_register_tokens": 0,
            "window_size": None,
            "pre_norm": False,
            "spatial_merge_size": 1,
        }
        for field, value in expected.items():
            if config[field] != value:
                raise ValueError(f"from_vit needs a teacher with {field}={value!r}, got {config[field]!r}")
        depth = config.num_layers
        num_cortex_layers = max(1, round(2 * depth / 3)) if num_cortex_layers is None else num_cortex_layers
        if not 1 <= num_cortex_layers <= depth:
            raise ValueError(f"num_cortex_layers must be in [1, teacher depth={depth}], got {num_cortex_layers}")
        copied = ("in_channels", "patch_size", "patch_bias", "num_attention_heads", "attention_head_dim")
        copied += ("mlp_hidden_dim", "mlp_type", "mlp_bias", "qkv_bias", "norm_type", "norm_eps")
        copied += ("layer_scale_init_value", "pos_embed_grid_size", "pos_embed_cls")
        model = cls(
            **{name: config[name] for name in copied},
            num_cortex_layers=num_cortex_layers,
            num_latent_tokens=num_latent_tokens,
            **kwargs,
        )
        model.to(teacher.device)
        if teacher.dtype != model.dtype:
            model.to(teacher.dtype)
        with torch.no_grad():
            model.patch_embed.load_state_dict(teacher.patch_embed.proj.state_dict())
            model.pos_embed.copy_(teacher.pos_embed)
            model.cls_token.copy_(teacher.cls_token)
            for block, source in zip(model.blocks, teacher.blocks[depth - num_cortex_layers :]):
                block.load_state_dict(source.state_dict())
            model.norm.load_state_dict(teacher.norm.state_dict())
        return model

    # ------------------------------------------------------------------------------------------------- pieces
    def _pos_grid(self, height: int, width: int) -> torch.Tensor:
        """The inherited position grid as a ``(1, D, height, width)`` map (bicubic resize when the grid differs)."""
        grid_h, grid_w = self.config.pos_embed_grid_size
        table = self.pos_embed[int(self.config.pos_embed_cls) :]
        grid = table.reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2)
        if (height, width) != (grid_h, grid_w):
            grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        return grid.to(table.dtype)

    def embed_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The teacher's input tokens (patch + position) as a ``(B, D, h, w)`` feature map."""
        config = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.in_channels:
            raise ValueError(
                f"pixel_values must be (B, {config.in_channels}, H, W), got shape {tuple(pixel_values.shape)}"
            )
        if min(pixel_values.shape[-2:]) < config.patch_size:
            raise ValueError(f"image {tuple(pixel_values.shape[-2:])} is smaller than one {config.patch_size}px patch")
        features = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, h, w)
        return features + self._pos_grid(*features.shape[-2:])

    def cls_embedding(self) -> torch.Tensor:
        """``(1, D)`` CLS token including its position row (as the teacher adds it)."""
        cls = self.cls_token
        return cls + self.pos_embed[:1] if self.config.pos_embed_cls else cls

    def forward_cortex(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the CLS, run the inherited blocks and final norm: ``(B, N, D)`` -> (normed CLS ``(B, D)``, tokens).

        With the latent tokens set to the teacher's input tokens and all teacher blocks inherited this is the teacher.
        """
        cls = self.cls_embedding().to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        hidden_states = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, D)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.norm(hidden_states)
        return hidden_states[:, 0], hidden_states[:, 1:]

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True) -> SparseFormerOutput | tuple:
        """Encode ``(B, C, H, W)`` images into ``num_latent_tokens`` tokens and an aligned pooled vector.

        Returns:
            :class:`SparseFormerOutput`, or its fields as a tuple when ``return_dict=False``.
        """
        feature_map = self.embed_tokens(pixel_values)  # (B, D, h, w)
        batch = feature_map.shape[0]
        tokens = self.latent_embed.to(feature_map.dtype).expand(batch, -1, -1)  # (B, N, Df)
        rois = self.roi_embed.float().expand(batch, -1, -1)  # (B, N, 4), RoI math in fp32
        for stage in range(self.config.num_focus_repeats):
            tokens = tokens + self.stage_embed[stage].to(tokens.dtype)
            tokens, rois, _ = self.focus(tokens, rois, feature_map)
        # the teacher's input token (patch + position) at each RoI centre, plus the zero-init learned residual: at
        # init the cortex sees a regular grid of real teacher tokens, and training only has to improve on that
        centre_tokens = _sample(feature_map, rois[:, :, None, :2], "border")[:, :, 0]  # (B, N, D)
        tokens = centre_tokens + self.transition(tokens)
        tokens, _, points = self.cortex_sampling(tokens, rois, feature_map)
        cls, tokens = self.forward_cortex(tokens)
        output = SparseFormerOutput(
            pooler_output=self.align_proj(cls), latent_tokens=tokens, rois=rois, sampling_points=points
        )
        return output if return_dict else output.to_tuple()


def sparseformer_alignment_loss(student: torch.Tensor, teacher: torch.Tensor, mse_weight: float = 0.0) -> torch.Tensor:
    """``mean(1 - cos(student, teacher)) + mse_weight * MSE``, both ``(B, D)`` (the bootstrapping objective)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher embeddings must have the same shape, got {student.shape} vs {teacher.shape}"
        )
    loss = (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(student.float(), teacher.float())
    return loss


@torch.no_grad()
def token_subset_baseline(
    teacher: VisionTransformerModel,
    pixel_values: torch.Tensor,
    num_tokens: int = 49,
    mode: str = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The teacher's pooled output from only ``num_tokens`` input tokens (the naive ways to use fewer tokens).

    The teacher's input tokens (patch + position) are reduced to ``num_tokens`` by ``"random"`` choice per image, by
    ``"pool"``: adaptive average pooling to a ``sqrt(n) x sqrt(n)`` grid, or by ``"grid"``: bilinear samples at the
    centres of :func:`initial_rois` (what an untrained :class:`SparseFormerModel` starts from). The CLS plus those
    tokens then go through all teacher blocks and the final norm.

    Returns:
        ``(B, D)`` normed CLS.
    """
    if mode not in ("random", "pool", "grid"):
        raise ValueError(f"mode must be 'random', 'pool' or 'grid', got {mode!r}")
    helper = SparseFormerModel.from_vit(
        teacher, num_latent_tokens=num_tokens, num_cortex_layers=teacher.config.num_layers
    )
    feature_map = helper.embed_tokens(pixel_values)  # (B, D, h, w)
    tokens = feature_map.flatten(2).transpose(1, 2)  # (B, h*w, D)
    if mode == "random":
        if num_tokens > tokens.shape[1]:
            raise ValueError(f"num_tokens ({num_tokens}) exceeds the teacher's {tokens.shape[1]} tokens")
        index = torch.stack(
            [torch.randperm(tokens.shape[1], generator=generator)[:num_tokens] for _ in range(tokens.shape[0])]
        ).to(tokens.device)
        tokens = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    elif mode == "grid":
        centres = initial_rois(num_tokens)[:, :2].to(feature_map.device)  # (N, 2)
        tokens = _sample(feature_map, centres[None, :, None].expand(len(feature_map), -1, -1, -1), "border")[:, :, 0]
    else:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"mode='pool' needs a square num_tokens, got {num_tokens}")
        tokens = F.adaptive_avg_pool2d(feature_map, side).flatten(2).transpose(1, 2)
    return helper.forward_cortex(tokens)[0]
