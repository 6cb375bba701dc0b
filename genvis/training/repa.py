"""REPA: representation alignment of an intermediate DiT layer with a frozen vision encoder (Yu et al., "Representation
Alignment for Generation: Training Diffusion Transformers Is Easier Than You Think", arXiv 2410.06940).

During training a forward hook captures the hidden states of one DiT block (LaVin-DiT: the *target* stream of
``transformer_blocks[layer]``; MVDiT: the video tokens of ``blocks[layer]``) without touching the model code. A
trainable MLP projects them to the width of a frozen encoder (a :class:`genvis.encoders.VisionTransformerModel`, built
natively or imported from a transformers checkpoint with ``load_transformers_vision_model``), whose patch features of
the *clean* target image / frames are resized (trilinear) to the DiT's token grid. The extra loss is the negative
cosine similarity, token-wise, averaged per sample then over the batch, times ``weight``::

    loss = diffusion_loss + weight * mean_b mean_n -cos(projector(h_bn), resize(E(x_clean))_bn)

Gradients reach the projector and the DiT blocks up to ``layer``, never the encoder. The projector is not part of the
DiT: it is dropped after training (checkpoints keep it for resuming).

The tiny CPU presets have no pretrained encoder to download, so :func:`fit_toy_encoder` trains a tiny ViT for a few
hundred steps with masked-patch reconstruction on whatever images it is given: a weak but *real* representation (it
encodes local colour/shape and some context), enough to show the mechanism's effect on the toy tasks. With a real
checkpoint (DINOv2 / SigLIP 2 / CLIP via ``load_transformers_vision_model``) the same code is the published recipe.

Tests: tests/efficiency/test_repa.py. Benchmark: benchmarks/repa.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genvis.encoders import VISION_TRANSFORMER_PRESETS, VisionTransformerModel

__all__ = [
    "BlockOutputCapture",
    "DiTAlignmentTarget",
    "REPALoss",
    "REPAOptions",
    "REPAProjector",
    "RepresentationAlignment",
    "build_repa",
    "dit_alignment_target",
    "fit_toy_encoder",
    "load_alignment_encoder",
]


class BlockOutputCapture:
    """Forward hook keeping what ``select(output)`` returns for the last call of ``module`` (graph intact).

    Use as a context manager (the hook is removed on exit) or call :meth:`remove`.
    """

    def __init__(self, module: nn.Module, select: Callable[[object], torch.Tensor] = lambda out: out) -> None:
        self.value: torch.Tensor | None = None
        self.calls = 0
        self._select = select
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: object) -> None:
        self.value = self._select(output)
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> BlockOutputCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class DiTAlignmentTarget:
    """Where a DiT's aligned tokens live.

    Args:
        blocks: the model's block list.
        select: block output -> tokens ``(B, N, D)`` (padded) or ``(1, sum N_i, D)`` (packed), raster ``(t, h, w)``.
        dim: token width.
        patch_size: ``(pt, ph, pw)`` latent patch, to turn latent shapes into token grids.
    """

    blocks: nn.ModuleList
    select: Callable[[object], torch.Tensor]
    dim: int
    patch_size: tuple[int, int, int]

    def token_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(C, T, H, W)`` latent shape of one sample -> its ``(t, h, w)`` token grid."""
        _, t, h, w = latent_shape[-4:]
        pt, ph, pw = self.patch_size
        return (t // pt, h // ph, w // pw)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    return model


def dit_alignment_target(model: nn.Module) -> DiTAlignmentTarget:
    """The alignment target of a LaVin-DiT (target stream) or MVDiT (video tokens), possibly DDP- or LoRA-wrapped."""
    from genvis.models.lavin_dit import LaVinDiTTransformer3DModel
    from genvis.models.mvdit import MVDiTTransformer3DModel

    model = _unwrap(model)
    if isinstance(model, LaVinDiTTransformer3DModel):
        p = int(model.config.patch_size)
        return DiTAlignmentTarget(model.transformer_blocks, lambda out: out[1], model.inner_dim, (1, p, p))
    if isinstance(model, MVDiTTransformer3DModel):
        patch = tuple(int(v) for v in model.config.patch_size)
        return DiTAlignmentTarget(model.blocks, lambda out: out[0].flatten(1, 2), model.inner_dim, patch)
    raise ValueError(
        f"model: expected a LaVinDiTTransformer3DModel or MVDiTTransformer3DModel, got {type(model).__name__}"
    )


class REPAProjector(nn.Module):
    """REPA's projector: ``Linear -> SiLU -> Linear -> SiLU -> Linear`` from the DiT width to the encoder width.

    Args:
        in_dim: DiT token width.
        out_dim: encoder feature width.
        hidden_dim: inner width (REPA uses 2048 for SiT-XL; default ``max(4 * in_dim, out_dim)``).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(4 * in_dim, out_dim)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.net(hidden_states)


@dataclass
class REPALoss:
    """Args:
    loss: ``weight * mean(-cos)``, to add to the diffusion loss.
    similarity: mean cosine similarity (detached), for logging.
    """

    loss: torch.Tensor
    similarity: torch.Tensor


class RepresentationAlignment:
    """The REPA loss for one DiT: frozen encoder, trainable :attr:`projector`, a hook on block ``layer``.

    Args:
        encoder: frozen feature extractor (put in eval mode, gradients off).
        model: the DiT (LaVin-DiT or MVDiT) whose block ``layer`` is aligned.
        layer: block index (negative counts from the end). REPA aligns an early layer (8 of 28 for SiT-XL).
        weight: ``lambda`` of the alignment term (REPA: 0.5).
        projector_hidden_dim: projector inner width.
        image_mean: per-channel mean the encoder expects; inputs are ``[-1, 1]`` images.
        image_std: per-channel std the encoder expects. The default (0.5, 0.5) maps ``[-1, 1]`` to itself.
        encoder_size: ``(H, W)`` the frames are resized to before encoding; default: the frame size rounded to the
            encoder patch (at least one patch).
        encoder_layer: encoder block whose patch tokens are the target (None: the final-normed last layer).
    """

    def __init__(
        self,
        encoder: VisionTransformerModel,
        model: nn.Module,
        layer: int,
        weight: float = 0.5,
        projector_hidden_dim: int | None = None,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        encoder_size: Sequence[int] | None = None,
        encoder_layer: int | None = None,
    ) -> None:
        target = dit_alignment_target(model)
        num_blocks = len(target.blocks)
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f"repa.layer: expected an index into {num_blocks} DiT blocks, got {layer}")
        if weight < 0:
            raise ValueError(f"repa.weight: expected >= 0, got {weight}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean / image_std: expected 3 values each, got {image_mean} / {image_std}")
        if encoder_size is not None and len(encoder_size) != 2:
            raise ValueError(f"encoder_size: expected (H, W), got {encoder_size}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.layer = layer % num_blocks
        self.weight = weight
        self.target = target
        self.encoder_dim = int(encoder.config.num_attention_heads * encoder.config.attention_head_dim)
        self.projector = REPAProjector(target.dim, self.encoder_dim, projector_hidden_dim)
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32)
        self.image_std = torch.tensor(image_std, dtype=torch.float32)
        self.encoder_size = tuple(encoder_size) if encoder_size is not None else None
        self.encoder_layer = encoder_layer
        self._capture: BlockOutputCapture | None = None

    # -------------------------------------------------------------------------------------------------- hook
    @contextmanager
    def capture(self, model: nn.Module | None = None):
        """Hook block ``layer`` of ``model`` (default: the model given at construction) for the enclosed forward."""
        blocks = self.target.blocks if model is None else dit_alignment_target(model).blocks
        self._capture = BlockOutputCapture(blocks[self.layer], self.target.select)
        try:
            yield self._capture
        finally:
            self._capture.remove()

    # -------------------------------------------------------------------------------------------------- encoder
    def _encoder_size(self, height: int, width: int) -> tuple[int, int]:
        if self.encoder_size is not None:
            return self.encoder_size
        p = int(self.encoder.config.patch_size)
        return (max(p, round(height / p) * p), max(p, round(width / p) * p))

    @torch.no_grad()
    def target_features(
        self, images: Sequence[torch.Tensor] | torch.Tensor, grids: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Encoder patch features of clean clips, resized to each sample's DiT token grid.

        Args:
            images: per sample ``(3, T, H, W)`` (or ``(3, H, W)``) in ``[-1, 1]``, or a batch ``(B, 3, T, H, W)``.
            grids: per sample the DiT token grid ``(t, h, w)``.

        Returns:
            per sample ``(t * h * w, D_enc)`` features in raster order.
        """
        if len(images) != len(grids):
            raise ValueError(f"got {len(images)} images for {len(grids)} token grids; expected one per sample")
        device = next(self.encoder.parameters()).device
        dtype = next(self.encoder.parameters()).dtype
        mean = self.image_mean.to(device).view(1, 3, 1, 1)
        std = self.image_std.to(device).view(1, 3, 1, 1)
        features = []
        for clip, grid in zip(images, grids):
            if clip.ndim == 3:
                clip = clip[:, None]
            if clip.ndim != 4 or clip.shape[0] != 3:
                raise ValueError(f"images: expected (3, T, H, W) clips in [-1, 1], got {tuple(clip.shape)}")
            frames = clip.to(device, torch.float32).transpose(0, 1)  # (T, 3, H, W)
            size = self._encoder_size(*frames.shape[-2:])
            if tuple(frames.shape[-2:]) != size:
                frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
            frames = ((frames + 1) / 2 - mean) / std
            layers = None if self.encoder_layer is None else [self.encoder_layer]
            out = self.encoder.forward_features(frames.to(dtype), intermediate_layers=layers)
            tokens = out.patch_tokens if layers is None else out.intermediates[0]
            maps = torch.stack([m[0] for m in self.encoder.patch_grids(out, tokens)])  # (T, h, w, D)
            volume = maps.permute(3, 0, 1, 2)[None].float()  # (1, D, T, h, w)
            if tuple(volume.shape[2:]) != tuple(grid):
                volume = F.interpolate(volume, size=tuple(grid), mode="trilinear", align_corners=False)
            features.append(volume[0].flatten(1).transpose(0, 1))  # (t*h*w, D)
        return features

    # -------------------------------------------------------------------------------------------------- loss
    def loss(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        latents: Sequence[torch.Tensor] | torch.Tensor,
        hidden_states: torch.Tensor | None = None,
    ) -> REPALoss:
        """Alignment loss of the captured block output against the clean targets.

        Args:
            images: clean target clips in ``[-1, 1]``, one per sample (see :meth:`target_features`).
            latents: the clean target latents the DiT was trained on (their shapes give the token grids).
            hidden_states: the block output; default: what :meth:`capture` recorded.
        """
        if hidden_states is None:
            if self._capture is None or self._capture.value is None:
                raise ValueError("no captured hidden states: run the DiT forward inside `with repa.capture():`")
            hidden_states = self._capture.value
        grids = [self.target.token_grid(z.shape) for z in latents]
        lengths = [math.prod(g) for g in grids]
        if hidden_states.shape[:-1].numel() != sum(lengths):
            raise ValueError(
                f"captured {tuple(hidden_states.shape)} tokens but the latents give token grids {grids} "
                f"({sum(lengths)} tokens); was the forward run on these latents?"
            )
        # one projector call for the whole batch (a DDP-wrapped projector must run once per backward)
        projected = self.projector(hidden_states.reshape(-1, hidden_states.shape[-1]).float()).split(lengths)
        targets = self.target_features(images, grids)
        sims = [F.cosine_similarity(z, f.to(z.device), dim=-1).mean() for z, f in zip(projected, targets)]
        similarity = torch.stack(sims).mean()
        return REPALoss(loss=-self.weight * similarity, similarity=similarity.detach())


# ------------------------------------------------------------------------------------------------------ encoders
def load_alignment_encoder(spec: str) -> tuple[VisionTransformerModel, tuple[float, ...], tuple[float, ...]]:
    """The frozen encoder of ``repa.encoder`` and the image mean/std it expects.

    Args:
        spec: a ``VisionTransformerModel.save_pretrained`` folder (e.g. the toy encoder written by benchmarks/repa.py
            or :func:`fit_toy_encoder`), or a transformers vision checkpoint folder (ViT, CLIP, SigLIP 2, DINOv2, ...;
            imported with ``load_transformers_vision_model``). Mean/std come from ``preprocessor_config.json`` when the
            folder has one, else (0.5, 0.5, 0.5): ``[-1, 1]`` inputs as they are.
    """
    from genvis.encoders.convert_transformers import load_transformers_vision_model

    path = Path(spec)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"repa.encoder: {spec!r} is not a folder with config.json (genvis or transformers encoder)")
    config = json.loads(config_file.read_text())
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if config.get("_class_name") == "VisionTransformerModel":
        encoder = VisionTransformerModel.from_pretrained(path)
    else:
        encoder = load_transformers_vision_model(path)
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        stats = json.loads(processor.read_text())
        mean, std = tuple(stats.get("image_mean", mean)), tuple(stats.get("image_std", std))
    return encoder.eval().requires_grad_(False), mean, std


def fit_toy_encoder(
    images: torch.Tensor,
    steps: int = 300,
    patch_size: int = 4,
    mask_ratio: float = 0.5,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> VisionTransformerModel:
    """Train the ``tiny`` ViT preset by masked-patch reconstruction (a toy stand-in for a pretrained encoder).

    The encoder sees images with ``mask_ratio`` of the patches replaced by its mask token and a linear head must
    reconstruct every patch's pixels from the final patch tokens, so the features carry local content and context.

    Args:
        images: ``(N, 3, H, W)`` in ``[-1, 1]``.
        steps: optimisation steps.
        patch_size: encoder patch (4: a 32 px image gives an 8 x 8 grid, the tiny LaVin-DiT's token grid).
        mask_ratio: fraction of masked patches.
        lr: AdamW learning rate.
        batch_size: images per step.
        seed: initialisation, batch and mask RNG.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio: expected a value in [0, 1), got {mask_ratio}")
    torch.manual_seed(seed)
    encoder = VisionTransformerModel(
        **{**VISION_TRANSFORMER_PRESETS["tiny"], "patch_size": patch_size, "use_mask_token": True}
    )
    dim = encoder.config.num_attention_heads * encoder.config.attention_head_dim
    head = nn.Linear(dim, 3 * patch_size * patch_size)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    for _ in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        # random flips: cheap augmentation for small image sets
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        out_h, out_w = batch.shape[-2] // patch_size, batch.shape[-1] // patch_size
        num = batch_size * out_h * out_w
        mask = torch.rand(num, generator=generator) < mask_ratio
        out = encoder.forward_features(batch, patch_mask=mask)
        target = F.unfold(batch, patch_size, stride=patch_size).transpose(1, 2).reshape(num, -1)  # (N, 3 p p)
        loss = F.mse_loss(head(out.patch_tokens), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return encoder.eval().requires_grad_(False)


@dataclass
class REPAOptions:
    """The ``repa`` section of the DiT train scripts.

    Args:
        enabled: add the alignment loss.
        weight: ``lambda`` of the alignment term.
        layer: DiT block whose output is aligned (negative counts from the end).
        encoder: frozen encoder folder (:func:`load_alignment_encoder`); None fits the toy encoder
            (:func:`fit_toy_encoder`) on the built-in images at start-up, a few seconds.
        encoder_layer: encoder block giving the targets (None: final-normed last layer).
        projector_hidden_dim: projector inner width (None: ``max(4 D, D_enc)``).
        toy_encoder_steps: steps of the toy encoder fit.
        toy_encoder_size: image size of the toy encoder fit.
    """

    enabled: bool = False
    weight: float = 0.5
    layer: int = 0
    encoder: str | None = None
    encoder_layer: int | None = None
    projector_hidden_dim: int | None = None
    toy_encoder_steps: int = 300
    toy_encoder_size: int = 32
    encoder_size: list[int] = field(default_factory=list)  # [H, W] frames are resized to; [] = frame size


def toy_encoder_images(size: int, num_scenes: int = 96) -> torch.Tensor:
    """Built-in real images plus procedural scenes as ``(N, 3, size, size)`` in ``[-1, 1]`` (toy encoder data)."""
    import numpy as np

    from genvis.data.builtin import builtin_images, procedural_scene

    arrays = [image for _, image in builtin_images(size)]
    arrays += [procedural_scene(10_000 + i, size=size).image for i in range(num_scenes)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def build_repa(options: REPAOptions, model: nn.Module, seed: int = 0) -> RepresentationAlignment:
    """The :class:`RepresentationAlignment` a train script's ``repa`` section describes, for ``model``."""
    if options.encoder is not None:
        encoder, mean, std = load_alignment_encoder(options.encoder)
    else:
        images = toy_encoder_images(options.toy_encoder_size)
        encoder = fit_toy_encoder(images, steps=options.toy_encoder_steps, seed=seed)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return RepresentationAlignment(
        encoder,
        model,
        layer=options.layer,
        weight=options.weight,
        projector_hidden_dim=options.projector_hidden_dim,
        image_mean=mean,
        image_std=std,
        encoder_size=options.encoder_size or None,
        encoder_layer=options.encoder_layer,
    )
