"""MLLM vision towers: the shared native-resolution ViT + 2x2 merger/projector feeding any ``transformers`` causal LM.

- :class:`VisionTowerModel` (diffusers ``ModelMixin``): a :class:`genvis.encoders.VisionTransformerModel` with a
  Qwen2-VL ``m x m`` patch merger projecting to the LM width. Images are single-chunk videos (Mavors, arXiv
  2504.10068): a video is cut into chunks of ``chunk_frames`` consecutive frames; each chunk is one encoder item whose
  attention spans the chunk's frames (the intra-chunk encoder), and an optional inter-chunk aggregator (a few
  transformer blocks over all chunk tokens of a video) uses 3D RoPE whose temporal index is the chunk's time position.
  A sinusoidal chunk-time embedding (zero-initialised projection) is also added, so time reaches the LM even without
  the aggregator.
- :class:`VisionLanguageModel`: the tower + a ``transformers`` ``AutoModelForCausalLM`` (tiny Qwen2/Llama by default).
  Placeholder tokens in ``input_ids`` are replaced by the tower's tokens, in order. ``save_pretrained`` writes
  ``vision_tower/`` (diffusers), ``language_model/`` (transformers, tied embeddings handled by transformers) and, when
  LoRA is enabled, ``lora/`` (peft adapter); ``from_pretrained`` restores all three.
- :class:`VisionLanguageProcessor`: tokenizer + :class:`genvis.encoders.NativeResolutionProcessor`; expands ``<image>``
  / ``<video>`` markers to the exact number of placeholder tokens, builds labels on the answer only.

Checked by tests/consumers/test_mllm.py: round trips (full and LoRA), gradient on every trainable parameter, LoRA only
trains adapters, chunk-order sensitivity of the aggregator, and an overfit run where the LM answers a question about
the image (shape colour) that it cannot answer from the text alone.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from genvis.encoders import NativeResolutionProcessor, PackedVisionInput, token_coordinates
from genvis.encoders.vit import VisionTransformerBlock, VisionTransformerModel
from genvis.layers import RotaryEmbedding, cu_seqlens_from_lengths

__all__ = [
    "VISION_LANGUAGE_PRESETS",
    "VisionLanguageConfig",
    "VisionLanguageModel",
    "VisionLanguageProcessor",
    "VisionTowerModel",
    "VisionTowerOutput",
    "tiny_text_config",
]


def tiny_text_config(model_type: str = "qwen2", vocab_size: int = 384, hidden_size: int = 64) -> dict:
    """A CPU-sized ``transformers`` causal-LM config dict (environment.md §5); 384 = ByT5 byte vocab + extras."""
    if model_type not in ("qwen2", "llama"):
        raise ValueError(f"model_type must be 'qwen2' or 'llama' for the tiny preset, got {model_type!r}")
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }


# Vision-side presets (the LM is chosen separately). "tiny" is the CI size: 8 px patches, 2x2 merge.
VISION_LANGUAGE_PRESETS: dict[str, dict] = {
    "tiny": {
        "vision_config": {
            "patch_size": 8,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "mlp_hidden_dim": 64,
            "num_register_tokens": 0,
            "use_cls_token": False,
            "pooling_type": "none",
            "spatial_merge_size": 2,
            "attend_across_frames": True,
        },
        "chunk_frames": 2,
        "num_aggregator_layers": 1,
        "aggregator_num_heads": 4,
    },
}


@dataclass
class VisionTowerOutput(BaseOutput):
    """Outputs of :class:`VisionTowerModel`.

    Args:
        tokens: ``(N_out, out_dim)`` LM-width tokens of all items back to back.
        tokens_per_item: number of tokens of each image/video, in input order.
        chunk_cu_seqlens: ``(num_chunks + 1,)`` chunk boundaries in ``tokens``.
    """

    tokens: torch.Tensor = None
    tokens_per_item: list[int] = None
    chunk_cu_seqlens: torch.Tensor = None


class VisionTowerModel(ModelMixin, ConfigMixin):
    """Native-resolution ViT + 2x2 merger/projector + chunk-time positions + optional inter-chunk aggregator.

    Args:
        vision_config: keyword arguments of :class:`genvis.encoders.VisionTransformerModel` (``merger_out_dim`` is set
            to ``out_dim``; ``spatial_merge_size`` defaults to 2).
        out_dim: token width handed to the LM (its ``hidden_size``).
        chunk_frames: consecutive video frames per chunk (one encoder item; a multiple of the temporal patch size).
        num_aggregator_layers: inter-chunk transformer blocks over each video's tokens (0 disables).
        aggregator_num_heads: attention heads of the aggregator (head dim must allow 3 even RoPE axes).
        time_embedding: add a sinusoidal embedding of the chunk time (zero-initialised projection).
        rope_theta: RoPE base of the aggregator.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vision_config: dict | None = None,
        out_dim: int = 64,
        chunk_frames: int = 2,
        num_aggregator_layers: int = 1,
        aggregator_num_heads: int = 4,
        time_embedding: bool = True,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        vision_kwargs = {
            "spatial_merge_size": 2,
            **(vision_config or VISION_LANGUAGE_PRESETS["tiny"]["vision_config"]),
        }
        vision_kwargs["merger_out_dim"] = out_dim
        self.encoder = VisionTransformerModel(**vision_kwargs)
        enc = self.encoder.config
        if chunk_frames < 1 or chunk_frames % enc.temporal_patch_size:
            raise ValueError(
                f"chunk_frames must be a positive multiple of temporal_patch_size={enc.temporal_patch_size}, "
                f"got {chunk_frames}"
            )
        if num_aggregator_layers < 0:
            raise ValueError(f"num_aggregator_layers must be >= 0, got {num_aggregator_layers}")
        self.merge_size = enc.spatial_merge_size
        self.time_proj = nn.Linear(out_dim, out_dim) if time_embedding else None

        self.aggregator = nn.ModuleList()
        self.aggregator_rope = None
        if num_aggregator_layers:
            if out_dim % aggregator_num_heads:
                raise ValueError(
                    f"out_dim ({out_dim}) must be divisible by aggregator_num_heads ({aggregator_num_heads})"
                )
            head_dim = out_dim // aggregator_num_heads
            spatial = (head_dim // 3) // 2 * 2  # even width for each of the h, w axes; time gets the rest
            if spatial < 2:
                raise ValueError(f"aggregator head dim {head_dim} is too small for 3D RoPE (need >= 6)")
            self.aggregator_rope = RotaryEmbedding(head_dim, [head_dim - 2 * spatial, spatial, spatial], rope_theta)
            self.aggregator = nn.ModuleList(
                [
                    VisionTransformerBlock(
                        out_dim, aggregator_num_heads, head_dim, 4 * out_dim, "gelu", True, True, "layer", 1e-6, None
                    )
                    for _ in range(num_aggregator_layers)
                ]
            )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero the time projection and each aggregator block's output projections so that, at init, the tower
        returns the merger output unchanged (a pretrained ViT + merger keeps its behaviour when they are added)."""
        if self.time_proj is not None:
            nn.init.zeros_(self.time_proj.weight)
            nn.init.zeros_(self.time_proj.bias)
        for block in self.aggregator:
            for linear in (block.attn.to_out, block.mlp.fc2):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    @classmethod
    def from_vit(cls, vit: VisionTransformerModel, out_dim: int, **kwargs) -> VisionTowerModel:
        """Wrap a (pretrained) genvis ViT: its weights are copied; a missing or differently sized merger is new.

        Args:
            vit: the encoder to reuse.
            out_dim: LM hidden size.
            kwargs: other :class:`VisionTowerModel` arguments.
        """
        vision_config = {k: v for k, v in vit.config.items() if not k.startswith("_")}
        if vision_config.get("spatial_merge_size", 1) == 1:
            raise ValueError(
                "vit.config.spatial_merge_size must be > 1 so tokens are block-major for the merger, got 1; build the "
                "ViT with spatial_merge_size=2 (the weights do not depend on it)"
            )
        tower = cls(vision_config=vision_config, out_dim=out_dim, **kwargs)
        state = {k: v for k, v in vit.state_dict().items() if not k.startswith("merger.")}
        missing, unexpected = tower.encoder.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("merger.") for k in missing):
            raise ValueError(f"ViT weights do not fit the tower: missing {missing}, unexpected {unexpected}")
        return tower

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        chunks_per_item: list[int] | torch.Tensor | None = None,
        chunk_times: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> VisionTowerOutput | tuple:
        """Encode packed chunks and return LM-width tokens per image/video.

        Args:
            pixel_values: packed ``(N, C * pt * p * p)`` patches of all chunks (one ``grid_thw`` row per chunk).
            grid_thw: ``(num_chunks, 3)``.
            chunks_per_item: chunks of each image/video (default: every chunk is its own item).
            chunk_times: ``(num_chunks,)`` time position of each chunk (chunk index within its video by default;
                seconds / chunk duration when the frame rate is known).
        """
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long, device=pixel_values.device)
        num_chunks = grid_thw.shape[0]
        chunks_per_item = [1] * num_chunks if chunks_per_item is None else [int(c) for c in chunks_per_item]
        if sum(chunks_per_item) != num_chunks or min(chunks_per_item) < 1:
            raise ValueError(f"chunks_per_item must be positive and sum to {num_chunks} chunks, got {chunks_per_item}")
        if chunk_times is None:
            chunk_times = torch.cat([torch.arange(n, dtype=torch.float32) for n in chunks_per_item])
        chunk_times = torch.as_tensor(chunk_times, dtype=torch.float32, device=pixel_values.device)
        if chunk_times.shape != (num_chunks,):
            raise ValueError(f"chunk_times must be ({num_chunks},), got shape {tuple(chunk_times.shape)}")

        # 1. intra-chunk encoder + merger: (N, patch_dim) -> (N / m^2, out_dim)
        tokens = self.encoder(pixel_values, grid_thw).merged_tokens
        merged_grid = grid_thw.clone()
        merged_grid[:, 1:] //= self.merge_size
        chunk_lengths = merged_grid.prod(-1)  # merged tokens per chunk
        token_times = torch.repeat_interleave(chunk_times, chunk_lengths)  # (N_out,)

        # 2. chunk-time embedding (zero-init projection; a no-op until trained)
        if self.time_proj is not None:
            freq = get_timestep_embedding(token_times, tokens.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
            tokens = tokens + self.time_proj(freq.to(tokens.dtype))

        # 3. inter-chunk aggregator over each item's tokens; RoPE axes = (chunk time, merged h, merged w)
        item_lengths = [int(n) for n in torch.stack([s.sum() for s in chunk_lengths.split(chunks_per_item)])]
        if len(self.aggregator):
            coords = token_coordinates(merged_grid).to(tokens.device)  # (N_out, 3), t restarts in each chunk
            # frames inside a chunk are merged by attention already; the temporal index is the chunk time
            positions = torch.stack([token_times, coords[:, 1].float(), coords[:, 2].float()], dim=-1)
            rotary = self.aggregator_rope(positions)
            cu_seqlens = cu_seqlens_from_lengths(item_lengths, device=tokens.device)
            for block in self.aggregator:
                tokens = block(tokens, rotary, cu_seqlens)
        output = VisionTowerOutput(
            tokens=tokens,
            tokens_per_item=item_lengths,
            chunk_cu_seqlens=cu_seqlens_from_lengths(chunk_lengths, device=tokens.device),
        )
        return output if return_dict else output.to_tuple()

    def num_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Merged LM tokens per chunk for a ``(num_chunks, 3)`` patch grid."""
        grid = torch.as_tensor(grid_thw)
        return [int(t * (h // self.merge_size) * (w // self.merge_size)) for t, h, w in grid.tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# Vision-language model


@dataclass
class VisionLanguageConfig:
    """Glue between tower and LM, saved as ``vision_language_config.json``.

    Args:
        image_token_id: LM token id of an image placeholder (one per image token).
        video_token_id: LM token id of a video placeholder.
        lora: peft ``LoraConfig`` kwargs when LoRA is enabled (None otherwise).
    """

    image_token_id: int
    video_token_id: int
    lora: dict | None = field(default=None)


class VisionLanguageModel(nn.Module):
    """A :class:`VisionTowerModel` feeding a ``transformers`` causal LM through placeholder tokens.

    Args:
        vision_tower: the tower; its ``out_dim`` must equal the LM ``hidden_size``.
        language_model: any ``transformers`` ``*ForCausalLM`` (``get_input_embeddings`` and ``inputs_embeds``).
        image_token_id: placeholder id for image tokens.
        video_token_id: placeholder id for video tokens.
    """

    CONFIG_NAME = "vision_language_config.json"

    def __init__(
        self, vision_tower: VisionTowerModel, language_model: nn.Module, image_token_id: int, video_token_id: int
    ) -> None:
        super().__init__()
        hidden = language_model.config.hidden_size
        if vision_tower.config.out_dim != hidden:
            raise ValueError(
                f"vision_tower.config.out_dim ({vision_tower.config.out_dim}) must equal the LM hidden_size ({hidden})"
            )
        vocab = language_model.get_input_embeddings().num_embeddings
        for name, token_id in (("image_token_id", image_token_id), ("video_token_id", video_token_id)):
            if not 0 <= token_id < vocab:
                raise ValueError(f"{name} must be in [0, vocab_size={vocab}), got {token_id}")
        if image_token_id == video_token_id:
            raise ValueError(f"image_token_id and video_token_id must differ, both are {image_token_id}")
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.config = VisionLanguageConfig(image_token_id, video_token_id)

    @classmethod
    def from_configs(
        cls,
        text_config: dict | None = None,
        vision_tower_config: dict | None = None,
        image_token_id: int = 259,
        video_token_id: int = 260,
    ) -> VisionLanguageModel:
        """Random-init model from a ``transformers`` config dict (``model_type`` key) and tower kwargs.

        Defaults: the tiny Qwen2 LM and the tiny tower; ids 259/260 are ByT5's ``<extra_id_0>``/``<extra_id_1>``.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        text_config = dict(text_config or tiny_text_config())
        if "model_type" not in text_config:
            raise ValueError("text_config needs a 'model_type' key (e.g. 'qwen2' or 'llama')")
        lm_config = AutoConfig.for_model(**text_config)
        language_model = AutoModelForCausalLM.from_config(lm_config)
        tower_kwargs = {**VISION_LANGUAGE_PRESETS["tiny"], **(vision_tower_config or {})}
        tower_kwargs["out_dim"] = lm_config.hidden_size
        return cls(VisionTowerModel(**tower_kwargs), language_model, image_token_id, video_token_id)

    # ------------------------------------------------------------------------------------------------- LoRA
    def enable_lora(
        self,
        r: int = 8,
        lora_alpha: int = 16,
        target_modules: list[str] | str | None = None,
        lora_dropout: float = 0.0,
        train_projector: bool = False,
    ) -> None:
        """Inject peft LoRA adapters into the LM and freeze everything else (optionally except the merger/projector).

        Args:
            r: LoRA rank.
            lora_alpha: LoRA scaling numerator.
            target_modules: LM module names (default the attention and MLP projections of Qwen2/Llama).
            lora_dropout: dropout on the adapter input.
            train_projector: also train the tower's merger, time projection and aggregator (LLaVA stage-2 style).
        """
        from peft import LoraConfig, inject_adapter_in_model

        if self.config.lora is not None:
            raise ValueError("LoRA is already enabled on this model")
        target = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        kwargs = {"r": r, "lora_alpha": lora_alpha, "target_modules": target, "lora_dropout": lora_dropout}
        inject_adapter_in_model(LoraConfig(**kwargs), self.language_model)
        self.config.lora = {**kwargs, "train_projector": train_projector}
        for name, param in self.named_parameters():
            trainable = "lora_" in name
            if train_projector and name.startswith("vision_tower.") and not name.startswith("vision_tower.encoder."):
                trainable = True  # time_proj, aggregator
            if train_projector and name.startswith("vision_tower.encoder.merger."):
                trainable = True
            param.requires_grad_(trainable)

    def _language_model_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(base LM state with plain names, LoRA adapter state); works with and without injected adapters."""
        base, adapter = {}, {}
        for key, value in self.language_model.state_dict().items():
            if "lora_" in key:
                adapter[key] = value
            else:
                base[key.replace(".base_layer.", ".")] = value
        return base, adapter

    # ------------------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``vision_tower/``, ``language_model/`` (base weights), ``lora/`` (if enabled) and the glue config."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vision_tower.save_pretrained(directory / "vision_tower")
        base, adapter = self._language_model_state()
        self.language_model.save_pretrained(directory / "language_model", state_dict=base)
        if self.config.lora is not None:
            (directory / "lora").mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(directory / "lora" / "adapter.safetensors"))
        (directory / self.CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, torch_dtype: torch.dtype | None = None
    ) -> VisionLanguageModel:
        """Load a folder written by :meth:`save_pretrained` (with its LoRA adapter, if any)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        config_path = directory / cls.CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"{directory} is not a VisionLanguageModel folder: {cls.CONFIG_NAME} is missing")
        config = json.loads(config_path.read_text())
        kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
        tower = VisionTowerModel.from_pretrained(
            directory / "vision_tower", **({} if torch_dtype is None else {"torch_dtype": torch_dtype})
        )
        language_model = AutoModelForCausalLM.from_pretrained(directory / "language_model", **kwargs)
        model = cls(tower, language_model, config["image_token_id"], config["video_token_id"])
        if config.get("lora") is not None:
            lora = dict(config["lora"])
            train_projector = lora.pop("train_projector", False)
            model.enable_lora(**lora, train_projector=train_projector)
            adapter = load_file(str(directory / "lora" / "adapter.safetensors"))
            missing, unexpected = model.language_model.load_state_dict(adapter, strict=False)
            bad = [k for k in missing if "lora_" in k]
            if bad or unexpected:
                raise ValueError(f"LoRA adapter does not fit: missing {bad}, unexpected {unexpected}")
        return model

    # ------------------------------------------------------------------------------------------------- forward
    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_chunks: list[int] | torch.Tensor | None = None,
        video_chunk_times: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, L)`` ids -> ``(B, L, hidden)`` embeddings with image/video placeholders replaced by tower tokens."""
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, hidden)
        for kind, token_id, pixels, grid, chunks, times in (
            ("image", self.config.image_token_id, pixel_values, image_grid_thw, None, None),
            (
                "video",
                self.config.video_token_id,
                pixel_values_videos,
                video_grid_thw,
                video_chunks,
                video_chunk_times,
            ),
        ):
            slots = input_ids == token_id
            num_slots = int(slots.sum())
            if pixels is None:
                if num_slots:
                    raise ValueError(f"input_ids hold {num_slots} {kind} placeholder tokens but no {kind} pixels")
                continue
            if grid is None:
                raise ValueError(f"{kind} pixels need {kind}_grid_thw")
            tokens = self.vision_tower(pixels, grid, chunks, times).tokens
            if tokens.shape[0] != num_slots:
                raise ValueError(
                    f"{kind}: the tower produced {tokens.shape[0]} tokens but input_ids hold {num_slots} placeholders "
                    f"(token id {token_id}); build inputs with VisionLanguageProcessor"
                )
            embeds = embeds.masked_scatter(slots[..., None], tokens.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_chunks: list[int] | torch.Tensor | None = None,
        video_chunk_times: torch.Tensor | None = None,
        **lm_kwargs,
    ):
        """Returns the LM's ``CausalLMOutputWithPast`` (``loss`` when ``labels`` are given; -100 is ignored)."""
        embeds = self.embed_inputs(
            input_ids,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            video_chunks,
            video_chunk_times,
        )
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_chunks: list[int] | torch.Tensor | None = None,
        video_chunk_times: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy/sampled continuation (new tokens only, ``(B, new)``); prompts must be left-padded."""
        embeds = self.embed_inputs(
            input_ids,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            video_chunks,
            video_chunk_times,
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Processor


class VisionLanguageProcessor:
    """Builds model inputs from text with ``<image>`` / ``<video>`` markers plus images and videos.

    Args:
        tokenizer: any ``transformers`` tokenizer (ByT5's byte tokenizer by default: no vocab file needed).
        image_processor: :class:`NativeResolutionProcessor` matching the tower (patch, temporal patch, merge size).
        merge_size: the tower's spatial merge size.
        chunk_frames: frames per video chunk (the tower's ``chunk_frames``).
        image_token_id: placeholder id written for every image token.
        video_token_id: placeholder id written for every video token.
        image_marker: marker text for an image in prompts.
        video_marker: marker text for a video in prompts.
    """

    def __init__(
        self,
        tokenizer,
        image_processor: NativeResolutionProcessor,
        merge_size: int,
        chunk_frames: int,
        image_token_id: int,
        video_token_id: int,
        image_marker: str = "<image>",
        video_marker: str = "<video>",
    ) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.merge_size, self.chunk_frames = merge_size, chunk_frames
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.image_marker, self.video_marker = image_marker, video_marker

    @classmethod
    def from_model(
        cls, model: VisionLanguageModel, tokenizer=None, **image_processor_kwargs
    ) -> VisionLanguageProcessor:
        """Processor matching ``model`` (ByT5 tokenizer when none is given)."""
        if tokenizer is None:
            from transformers import ByT5Tokenizer

            tokenizer = ByT5Tokenizer()
        tower = model.vision_tower
        return cls(
            tokenizer,
            NativeResolutionProcessor.from_model(tower.encoder, **image_processor_kwargs),
            tower.merge_size,
            tower.config.chunk_frames,
            model.config.image_token_id,
            model.config.video_token_id,
        )

    def _chunk_video(self, video: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
        """``(T, C, H, W)`` -> chunks of ``chunk_frames`` frames (last one padded by repetition) and their times."""
        if video.ndim != 4:
            raise ValueError(f"a video must be (T, C, H, W), got shape {tuple(video.shape)}")
        num = math.ceil(video.shape[0] / self.chunk_frames)
        chunks = [video[i * self.chunk_frames : (i + 1) * self.chunk_frames] for i in range(num)]
        if chunks[-1].shape[0] < self.chunk_frames:
            pad = self.chunk_frames - chunks[-1].shape[0]
            chunks[-1] = torch.cat([chunks[-1], chunks[-1][-1:].expand(pad, *video.shape[1:])])
        # time position of a chunk = its start frame in chunk units (frame index / chunk_frames)
        return chunks, [float(i) for i in range(num)]

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def __call__(
        self,
        prompts: list[str],
        images: list | None = None,
        videos: list[torch.Tensor] | None = None,
        answers: list[str] | None = None,
        add_eos: bool = True,
    ) -> dict:
        """Tokenise a batch (left padding, so it also serves ``generate``).

        Args:
            prompts: one string per sample; each ``<image>`` / ``<video>`` marker consumes the next image / video.
            images: images in marker order over the whole batch (PIL, ``(C, H, W)`` tensors or arrays).
            videos: ``(T, C, H, W)`` clips in marker order.
            answers: target strings; when given, ``labels`` cover the answer (+ EOS) only, -100 elsewhere.
            add_eos: append the tokenizer's EOS after each answer.

        Returns:
            dict with ``input_ids``, ``attention_mask``, (``labels``), and ``pixel_values`` / ``image_grid_thw`` /
            ``pixel_values_videos`` / ``video_grid_thw`` / ``video_chunks`` / ``video_chunk_times`` when present.
        """
        images, videos = list(images or []), list(videos or [])
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"answers must have one entry per prompt ({len(prompts)}), got {len(answers)}")
        out: dict = {}
        image_tokens: list[int] = []
        video_tokens: list[int] = []
        if images:
            packed = self.image_processor(images)
            out["pixel_values"], out["image_grid_thw"] = packed.pixel_values, packed.grid_thw
            image_tokens = [
                int(t * (h // self.merge_size) * (w // self.merge_size)) for t, h, w in packed.grid_thw.tolist()
            ]
        if videos:
            chunks, times, per_video = [], [], []
            for video in videos:
                video_chunks, video_times = self._chunk_video(torch.as_tensor(video))
                chunks += video_chunks
                times += video_times
                per_video.append(len(video_chunks))
            packed: PackedVisionInput = self.image_processor(chunks)
            out["pixel_values_videos"], out["video_grid_thw"] = packed.pixel_values, packed.grid_thw
            out["video_chunks"] = torch.tensor(per_video)
            out["video_chunk_times"] = torch.tensor(times)
            counts = [int(t * (h // self.merge_size) * (w // self.merge_size)) for t, h, w in packed.grid_thw.tolist()]
            video_tokens = [sum(c) for c in _split(counts, per_video)]

        sequences, label_rows = [], []
        image_iter, video_iter = iter(image_tokens), iter(video_tokens)
        for index, prompt in enumerate(prompts):
            ids: list[int] = []
            for part in _split_markers(prompt, self.image_marker, self.video_marker):
                if part == self.image_marker:
                    count = next(image_iter, None)
                    if count is None:
                        raise ValueError(f"prompt {index} has more {self.image_marker} markers than images given")
                    ids += [self.image_token_id] * count
                elif part == self.video_marker:
                    count = next(video_iter, None)
                    if count is None:
                        raise ValueError(f"prompt {index} has more {self.video_marker} markers than videos given")
                    ids += [self.video_token_id] * count
                elif part:
                    ids += self._tokenize(part)
            labels = [-100] * len(ids)
            if answers is not None:
                answer = self._tokenize(answers[index]) + ([self.tokenizer.eos_token_id] if add_eos else [])
                ids += answer
                labels += answer
            sequences.append(ids)
            label_rows.append(labels)
        if next(image_iter, None) is not None or next(video_iter, None) is not None:
            raise ValueError(
                f"got {len(images)} images / {len(videos)} videos but the prompts have fewer {self.image_marker} / "
                f"{self.video_marker} markers"
            )
        length = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out["input_ids"] = torch.tensor([[pad] * (length - len(s)) + s for s in sequences])
        out["attention_mask"] = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
        if answers is not None:
            out["labels"] = torch.tensor([[-100] * (length - len(r)) + r for r in label_rows])
        return out


def _split(values: list[int], sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start : start + size])
        start += size
    return out


def _split_markers(text: str, *markers: str) -> list[str]:
    """Split ``text`` into plain parts and markers, keeping the markers."""
    parts = [text]
    for marker in markers:
        parts = [piece for part in parts for piece in _split_keep(part, marker, markers)]
    return parts


def _split_keep(part: str, marker: str, markers: tuple[str, ...]) -> list[str]:
    if part in markers:
        return [part]
    pieces = part.split(marker)
    out = []
    for i, piece in enumerate(pieces):
        if i:
            out.append(marker)
        out.append(piece)
    return out
