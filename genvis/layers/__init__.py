"""The shared transformer core: attention, rotary embeddings, norms, MLPs, adaLN modulation, patch embedding."""

from genvis.layers.attention import Attention, attention, cu_seqlens_from_lengths, lengths_from_cu_seqlens
from genvis.layers.mlp import GELUMLP, SwiGLU, swiglu_hidden_dim
from genvis.layers.norm import AdaLNModulation, RMSNorm, modulate
from genvis.layers.packing import pack_sequences, pad_packed, unpack_sequences
from genvis.layers.patch_embed import PatchEmbed, patchify, unpatchify
from genvis.layers.rope import RotaryEmbedding, apply_rotary_emb, grid_position_ids

__all__ = [
    "GELUMLP",
    "AdaLNModulation",
    "Attention",
    "PatchEmbed",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary_emb",
    "attention",
    "cu_seqlens_from_lengths",
    "grid_position_ids",
    "lengths_from_cu_seqlens",
    "modulate",
    "pack_sequences",
    "pad_packed",
    "patchify",
    "swiglu_hidden_dim",
    "unpack_sequences",
    "unpatchify",
]
