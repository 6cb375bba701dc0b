"""Attention with one entry point for padded batches and packed variable-length sequences.

Layouts:
- padded: ``(B, S, H, D)`` tensors, optional key-padding mask ``(B, S)`` (True = keep) or a full boolean/additive mask.
- packed: ``(T, H, D)`` tensors holding several sequences back to back, delimited by ``cu_seqlens`` (int32, ``(N+1,)``,
  starting at 0 and ending at T). Tokens attend only inside their own sequence.

Backends for packed input: on CUDA, ``torch.nn.attention.varlen.varlen_attn`` (flash varlen) when the installed torch
has it and the dtype is half precision; everywhere else a per-segment SDPA loop, which does sum(L_i^2) work instead of
(sum L_i)^2 for a dense block-diagonal mask (see BENCHMARKS.md, "Packed attention").

GQA: key/value may carry fewer heads than query (``H % H_kv == 0``); they are shared by groups of query heads.
Checked against per-sequence SDPA in tests/layers/test_attention.py.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genvis.layers.norm import RMSNorm
from genvis.layers.rope import apply_rotary_emb

__all__ = ["Attention", "attention", "cu_seqlens_from_lengths", "lengths_from_cu_seqlens"]


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Cumulative sequence boundaries ``[0, L0, L0+L1, ...]`` as int32."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    if lengths.ndim != 1 or (lengths <= 0).any():
        raise ValueError(f"lengths must be a 1-D list of positive ints, got {lengths.tolist()}")
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the token count {total}, got [{first}, ..., {last}]")
    if (cu_seqlens[1:] < cu_seqlens[:-1]).any():
        raise ValueError("cu_seqlens must be non-decreasing")


def _sdpa_bshd(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    # (B, S, H, D) -> (B, H, S, D) for SDPA and back
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )
    return out.transpose(1, 2)


def _varlen_available(query: torch.Tensor) -> bool:
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    backend: Literal["auto", "sdpa", "varlen"] = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention over a padded batch or packed sequences.

    Args:
        query: ``(B, S, H, D)`` padded, or ``(T, H, D)`` packed when ``cu_seqlens`` is given.
        key: same layout as ``query`` with ``H_kv`` heads (``H % H_kv == 0``).
        value: same as ``key``.
        cu_seqlens: ``(N+1,)`` int32 boundaries of the packed sequences.
        max_seqlen: longest sequence in the pack (only used by the varlen kernel; derived when omitted).
        attn_mask: padded layout only: a ``(B, S_k)`` key-padding mask (True = attend) or any mask SDPA accepts
            broadcastable to ``(B, H, S_q, S_k)``.
        is_causal: causal masking inside each sequence.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` picks flash varlen on CUDA half precision and the per-segment SDPA loop otherwise.

    Returns:
        Tensor in the layout of ``query``.
    """
    num_heads, num_kv_heads = query.shape[-2], key.shape[-2]
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    enable_gqa = num_heads != num_kv_heads

    if cu_seqlens is None:
        if query.ndim != 4:
            raise ValueError(f"padded attention expects (B, S, H, D) tensors, got query shape {tuple(query.shape)}")
        if attn_mask is not None and attn_mask.ndim == 2:
            if attn_mask.shape != (key.shape[0], key.shape[1]):
                raise ValueError(
                    f"key-padding mask must be (B, S_k) = {(key.shape[0], key.shape[1])}, got {tuple(attn_mask.shape)}"
                )
            attn_mask = attn_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, S_k)
        return _sdpa_bshd(query, key, value, attn_mask, is_causal, scale, enable_gqa)

    if query.ndim != 3:
        raise ValueError(f"packed attention expects (T, H, D) tensors, got query shape {tuple(query.shape)}")
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported together with cu_seqlens; sequences are separated by cu_seqlens")
    _check_cu_seqlens(cu_seqlens, query.shape[0])

    use_varlen = backend == "varlen" or (backend == "auto" and _varlen_available(query))
    if use_varlen:
        from torch.nn.attention.varlen import varlen_attn

        if enable_gqa:  # the flash varlen kernel wants equal head counts
            key = key.repeat_interleave(num_heads // num_kv_heads, dim=-2)
            value = value.repeat_interleave(num_heads // num_kv_heads, dim=-2)
        cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
        max_len = max_seqlen or int((cu[1:] - cu[:-1]).max())
        return varlen_attn(query, key, value, cu, cu, max_len, max_len, is_causal=is_causal, scale=scale)

    # Per-segment SDPA: one (1, L_i) problem per sequence; no (T x T) mask is ever built.
    bounds = cu_seqlens.tolist()
    lengths = {e - s for s, e in itertools.pairwise(bounds)}
    if len(lengths) == 1:  # equal lengths (one image size, video frames): one batched call, no loop
        n = len(bounds) - 1
        batched = [t.unflatten(0, (n, -1)) for t in (query, key, value)]  # (N, L, H, D)
        return _sdpa_bshd(*batched, None, is_causal, scale, enable_gqa).flatten(0, 1)
    outputs = [
        _sdpa_bshd(query[None, s:e], key[None, s:e], value[None, s:e], None, is_causal, scale, enable_gqa)[0]
        for s, e in itertools.pairwise(bounds)
        if e > s
    ]
    return torch.cat(outputs, dim=0)


class Attention(nn.Module):
    """Multi-head self/cross attention with GQA, optional QK-norm and rotary embeddings.

    Args:
        dim: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA); defaults to ``num_heads``.
        head_dim: per-head width; defaults to ``dim // num_heads``.
        qk_norm: ``"rms"`` or ``"layer"`` normalisation of queries and keys, or None.
        qk_norm_across_heads: normalise over the full projected width (LaVin-DiT, Wan) instead of per head.
        bias: bias on the q/k/v projections.
        out_bias: bias on the output projection.
        cross_attention_dim: width of ``encoder_hidden_states`` for cross attention; None for self attention.
        rope_interleaved: the rotary tables pair neighbouring channels (see :mod:`genvis.layers.rope`).
        eps: norm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: Literal["rms", "layer"] | None = None,
        qk_norm_across_heads: bool = False,
        bias: bool = False,
        out_bias: bool = True,
        cross_attention_dim: int | None = None,
        rope_interleaved: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(
                    f"dim ({dim}) must be divisible by num_heads ({num_heads}) when head_dim is not given"
                )
            head_dim = dim // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_interleaved = rope_interleaved
        kv_in = cross_attention_dim or dim
        self.to_q = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.to_k = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.to_v = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.to_out = nn.Linear(num_heads * head_dim, dim, bias=out_bias)

        self.qk_norm_across_heads = qk_norm_across_heads
        q_width = num_heads * head_dim if qk_norm_across_heads else head_dim
        k_width = num_kv_heads * head_dim if qk_norm_across_heads else head_dim
        if qk_norm is None:
            self.norm_q = self.norm_k = None
        elif qk_norm == "rms":
            self.norm_q, self.norm_k = RMSNorm(q_width, eps=eps), RMSNorm(k_width, eps=eps)
        elif qk_norm == "layer":
            self.norm_q, self.norm_k = nn.LayerNorm(q_width, eps=eps), nn.LayerNorm(k_width, eps=eps)
        else:
            raise ValueError(f"qk_norm must be 'rms', 'layer' or None, got {qk_norm!r}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        encoder_cu_seqlens: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Args:
        hidden_states: ``(B, S, dim)`` or packed ``(T, dim)``.
        encoder_hidden_states: keys/values source for cross attention (same layout).
        rotary_emb: ``(cos, sin)`` from :class:`genvis.layers.rope.RotaryEmbedding`, applied to q and k
            (self attention only).
        cu_seqlens: packed boundaries of ``hidden_states``.
        encoder_cu_seqlens: packed boundaries of ``encoder_hidden_states`` (cross attention, packed).
        attn_mask: padded layout only, see :func:`attention`.
        """
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = self.to_q(hidden_states), self.to_k(context), self.to_v(context)
        if self.qk_norm_across_heads and self.norm_q is not None:
            query, key = self.norm_q(query), self.norm_k(key)
        query = query.unflatten(-1, (self.num_heads, self.head_dim))  # (..., S, H, D)
        key = key.unflatten(-1, (self.num_kv_heads, self.head_dim))
        value = value.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if not self.qk_norm_across_heads and self.norm_q is not None:
            query, key = self.norm_q(query), self.norm_k(key)
        if rotary_emb is not None:
            cos, sin = rotary_emb
            query = apply_rotary_emb(query, cos, sin, self.rope_interleaved)
            key = apply_rotary_emb(key, cos, sin, self.rope_interleaved)

        if encoder_hidden_states is not None and cu_seqlens is not None:
            out = _packed_cross_attention(query, key, value, cu_seqlens, encoder_cu_seqlens)
        else:
            out = attention(query, key, value, cu_seqlens=cu_seqlens, attn_mask=attn_mask, is_causal=is_causal)
        return self.to_out(out.flatten(-2))


def _packed_cross_attention(query, key, value, cu_q, cu_k):
    if cu_k is None or cu_k.numel() != cu_q.numel():
        raise ValueError("packed cross attention needs encoder_cu_seqlens with one entry per query sequence")
    _check_cu_seqlens(cu_q, query.shape[0])
    _check_cu_seqlens(cu_k, key.shape[0])
    bq, bk = cu_q.tolist(), cu_k.tolist()
    enable_gqa = query.shape[-2] != key.shape[-2]
    outputs = [
        _sdpa_bshd(query[None, qs:qe], key[None, ks:ke], value[None, ks:ke], None, False, None, enable_gqa)[0]
        for qs, qe, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:])
    ]
    return torch.cat(outputs, dim=0)
