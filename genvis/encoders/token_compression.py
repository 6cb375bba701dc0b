"""Token compression for the shared ViT: parameter-free ToMe merging and DiffRate learned per-layer prune/merge rates.

Attach a compressor with :func:`apply_token_compression` (or ``model.set_token_compression``); the encoder's weights,
state dict and outputs' shapes are unchanged. Inside every block the reduction happens between attention and MLP:

- :class:`ToMeCompressor` (Bolya et al., ICLR 2023): ``r`` tokens per block merged by bipartite soft matching on the
  attention keys (averaged over heads), size-weighted averages, optional proportional attention (``+log(size)``).
- :class:`DiffRateCompressor` (Chen et al., ICCV 2023): tokens ranked by CLS attention; per block a pruned count
  ``K_l`` (the tail is dropped) and a merged count ``M_l <= K_l`` (kept tokens outside the top ``M_l`` merge into
  their most similar top-``M_l`` token). ``K_l`` and ``M_l`` are expectations of learnable categorical distributions
  over candidate counts ``{N, N-g, ...}`` with a straight-through ceil; in search mode (``compressor.train()``) the
  sequence keeps its length and pruned/merged tokens are masked out of a masked softmax with straight-through masks,
  so the forward equals hard compression while gradients reach the rate logits. :func:`search_diffrate` trains only
  the rates (encoder frozen) against ``distill loss + lambda * (GFLOPs / target - 1)^2``. In eval mode the tokens are
  really dropped and merged.

- :class:`ExpeditCompressor` (Liang et al., NeurIPS 2022): parameter-free hourglass for dense outputs: patch tokens
  clustered once after block ``location`` by local soft k-means, reconstructed from the clusters after the last block.

Dense outputs: after the last block every original token copies the slot it was merged into (or, for a pruned
token, its most similar kept token), so ``patch_tokens``, intermediates, pooling and the patch merger see full-length
sequences. Packing: images are never mixed; segments of equal length run as one batch, other lengths in their own
batch, with per-image counts scaled from the reference length. FLOPs are multiply-accumulates of the blocks (DiffRate
convention: attention ``4NC^2 + 2N^2C``, MLP ``2NCH``, SwiGLU ``3NCH``).

Tests: tests/efficiency/test_token_compression.py; benchmark: benchmarks/token_compression.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from genvis.layers import apply_rotary_emb, attention, cu_seqlens_from_lengths
from genvis.layers.token_merging import (
    TokenAssignment,
    bipartite_soft_matching,
    compose_source,
    importance_merge,
    merge_tokens,
    proportional_attention_bias,
    unmerge_tokens,
)

if TYPE_CHECKING:
    from genvis.encoders.vit import VisionTransformerModel

__all__ = [
    "DiffRateCompressor",
    "ExpeditCompressor",
    "ToMeCompressor",
    "TokenCompressor",
    "apply_token_compression",
    "encoder_flops",
    "search_diffrate",
]


def _ceil_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.ceil(x) - x).detach()


def _ste(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return hard + soft - soft.detach()


def block_flops(num_in: torch.Tensor | float, num_out: torch.Tensor | float, dim: int, mlp_hidden: int, mlp_type: str):
    """Multiply-accumulates of one ViT block: attention on ``num_in`` tokens, MLP on ``num_out`` (after reduction)."""
    mlp_mats = 3 if mlp_type == "swiglu" else 2
    return 4 * num_in * dim**2 + 2 * num_in**2 * dim + mlp_mats * num_out * dim * mlp_hidden


def encoder_flops(
    model: VisionTransformerModel, num_patches: int, kept_per_block: list[float] | list[torch.Tensor] | None = None
) -> torch.Tensor | float:
    """Block MACs of one image with ``num_patches`` patch tokens.

    Args:
        model: the encoder (its width, MLP and special-token count are read).
        num_patches: patch tokens of the image.
        kept_per_block: unprotected tokens left after each block's reduction (None: no compression). Entries may be
            tensors (differentiable, as in the DiffRate search).
    """
    config = model.config
    num_layers = config.num_layers
    kept = [num_patches] * num_layers if kept_per_block is None else list(kept_per_block)
    if len(kept) != num_layers:
        raise ValueError(f"kept_per_block needs {num_layers} entries (one per block), got {len(kept)}")
    special = model.num_special_tokens
    total, current = 0.0, num_patches
    for after in kept:
        total = total + block_flops(
            current + special, after + special, model.dim, config.mlp_hidden_dim, config.mlp_type
        )
        current = after
    return total


def _qkv(attn: nn.Module, hidden_states: torch.Tensor, rotary: tuple | None):
    """The shared :class:`genvis.layers.Attention` projections on ``(B, N, D)``; also returns keys before RoPE."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if attn.qk_norm_across_heads and attn.norm_q is not None:
        query, key = attn.norm_q(query), attn.norm_k(key)
    query = query.unflatten(-1, (attn.num_heads, attn.head_dim))  # (B, N, H, Dh)
    key = key.unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    value = value.unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    if not attn.qk_norm_across_heads and attn.norm_q is not None:
        query, key = attn.norm_q(query), attn.norm_k(key)
    metric = key.mean(-2)  # (B, N, Dh) ToMe similarity features
    if rotary is not None:
        query = apply_rotary_emb(query, *rotary, attn.rope_interleaved)
        key = apply_rotary_emb(key, *rotary, attn.rope_interleaved)
    return query, key, value, metric


def _finish_block(block: nn.Module, hidden_states: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    if block.layer_scale1 is not None:
        attn_out = attn_out * block.layer_scale1
    return hidden_states + attn_out


def _mlp(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    mlp_out = block.mlp(block.norm2(hidden_states))
    if block.layer_scale2 is not None:
        mlp_out = mlp_out * block.layer_scale2
    return hidden_states + mlp_out


class TokenCompressor(nn.Module):
    """Runs the encoder blocks on equal-length groups of segments and reduces tokens between attention and MLP.

    Subclasses implement :meth:`plan` (hard reduction) and may override :meth:`_run_group`.

    Args:
        proportional_attention: add ``log(size)`` to attention logits once tokens were merged.
    """

    needs_cls_attention = False

    def __init__(self, proportional_attention: bool = True) -> None:
        super().__init__()
        self.proportional_attention = proportional_attention
        self.last_kept: list[int] = []  # unprotected tokens after each block in the last forward (first group)

    def plan(
        self, index: int, metric: torch.Tensor, scores: torch.Tensor | None, num_protected: int, num_patches: int
    ) -> TokenAssignment | None:
        raise NotImplementedError

    def macs(self, model: VisionTransformerModel, num_patches: int) -> float:
        """Block MACs per image of the last forward (``last_kept``; reductions between attention and MLP)."""
        return float(encoder_flops(model, num_patches, self.last_kept))

    def forward(self, model, hidden_states: torch.Tensor, rotary: tuple | None, layout, collect: set[int]):
        """``(S, D)`` packed sequence (special tokens first in each segment) -> same shape, plus intermediates."""
        num_special = layout.num_special
        lengths = [n + num_special for n in layout.segment_lengths]
        starts = layout.cu_seqlens[:-1].tolist()
        num_segments = len(lengths)
        extent = layout.coords.new_zeros(num_segments, 3)  # per segment (frames, rows, cols) of its patch grid
        for axis in range(3):
            extent[:, axis].scatter_reduce_(0, layout.segment_ids, layout.coords[:, axis] + 1, "amax")
        groups: dict[tuple, list[int]] = {}
        for segment, (length, shape) in enumerate(zip(lengths, extent.tolist())):
            groups.setdefault((length, *shape), []).append(segment)
        patch_offset = cu_seqlens_from_lengths(layout.segment_lengths).tolist()
        outputs, positions = [], []
        inter_parts: dict[int, list[torch.Tensor]] = {i: [] for i in collect}
        for (length, *_), segments in groups.items():
            index = torch.stack(
                [torch.arange(starts[s], starts[s] + length, device=hidden_states.device) for s in segments]
            )  # (G, L)
            group_rotary = None if rotary is None else tuple(table[index] for table in rotary)
            first = segments[0]
            coords = layout.coords[patch_offset[first] : patch_offset[first + 1]]  # (P, 3), same for the group
            out, inter = self._run_group(model, hidden_states[index], group_rotary, num_special, collect, coords)
            outputs.append(out.reshape(-1, out.shape[-1]))
            positions.append(index.reshape(-1))
            for i in collect:
                inter_parts[i].append(inter[i].reshape(-1, out.shape[-1]))
        inverse = torch.argsort(torch.cat(positions))
        intermediates = {i: torch.cat(parts)[inverse] for i, parts in inter_parts.items()}
        return torch.cat(outputs)[inverse], intermediates

    def _run_group(
        self,
        model,
        x: torch.Tensor,
        rotary: tuple | None,
        num_protected: int,
        collect: set[int],
        coords: torch.Tensor | None = None,
    ):
        """``x``: ``(G, L, D)`` segments of one shape (special tokens first); ``coords``: ``(P, 3)`` patch positions."""
        batch, num_tokens, _ = x.shape
        num_patches = num_tokens - num_protected
        if self.needs_cls_attention and not model.config.use_cls_token:
            raise ValueError(f"{type(self).__name__} ranks tokens by CLS attention; the encoder needs use_cls_token")
        size = None  # None while no token was merged: plain attention, bit-identical to the uncompressed encoder
        source = torch.arange(num_tokens, device=x.device).expand(batch, -1)
        intermediates, kept = {}, []
        for index, block in enumerate(model.blocks):
            query, key, value, metric = _qkv(block.attn, block.norm1(x), rotary)
            bias = (
                proportional_attention_bias(size, query.dtype)
                if self.proportional_attention and size is not None
                else None
            )
            out = attention(query, key, value, attn_mask=bias)
            x = _finish_block(block, x, block.attn.to_out(out.flatten(-2)))
            scores = None
            if self.needs_cls_attention:
                logits = torch.einsum("bhd,bnhd->bhn", query[:, 0], key) * query.shape[-1] ** -0.5
                if bias is not None:
                    logits = logits + bias[:, :, 0]
                scores = logits.softmax(-1).mean(1)  # (B, N) CLS attention averaged over heads
            assignment = self.plan(index, metric, scores, num_protected, num_patches)
            if assignment is not None and assignment.num_out < x.shape[1]:
                x, size = merge_tokens(x, assignment, size)
                source = compose_source(source, assignment)
                if rotary is not None:
                    rep = assignment.representative[..., None]
                    rotary = tuple(t.gather(1, rep.expand(-1, -1, t.shape[-1])) for t in rotary)
            x = _mlp(block, x)
            kept.append(x.shape[1] - num_protected)
            if index in collect:
                intermediates[index] = unmerge_tokens(x, source)
        self.last_kept = kept
        return unmerge_tokens(x, source), intermediates


class ToMeCompressor(TokenCompressor):
    """Parameter-free ToMe: merge ``r`` tokens in every block by bipartite soft matching.

    Args:
        r: tokens removed per block (an int for all blocks, or one per block). Counts refer to
            ``reference_num_patches`` patch tokens and are scaled for images of other sizes.
        reference_num_patches: patch tokens the ``r`` schedule was chosen for (None: use ``r`` as given).
        proportional_attention: ToMe's ``log(size)`` attention bias.
    """

    def __init__(
        self, r: int | list[int], reference_num_patches: int | None = None, proportional_attention: bool = True
    ) -> None:
        super().__init__(proportional_attention)
        values = [r] if isinstance(r, int) else list(r)
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0 in every block, got {r}")
        self.r = r
        self.reference_num_patches = reference_num_patches

    def plan(self, index, metric, scores, num_protected, num_patches):
        r = self.r if isinstance(self.r, int) else self.r[index] if index < len(self.r) else 0
        if self.reference_num_patches:
            r = round(r * num_patches / self.reference_num_patches)
        if r == 0:
            return None
        return bipartite_soft_matching(metric, r, num_protected)


class DiffRateCompressor(TokenCompressor):
    """DiffRate: learnable per-block prune and merge counts, searched under a FLOP target.

    Args:
        num_layers: encoder blocks.
        num_patches: reference patch tokens per image (counts scale to other image sizes).
        granularity: spacing ``g`` of the candidate counts ``{N, N-g, ..., min_tokens}``.
        min_tokens: smallest candidate count.
        proportional_attention: ``log(size)`` attention bias after merging.
        init_keep_logit: initial logit of the keep-everything candidate (others start at 0).
    """

    needs_cls_attention = True

    def __init__(
        self,
        num_layers: int,
        num_patches: int,
        granularity: int = 4,
        min_tokens: int = 1,
        proportional_attention: bool = True,
        init_keep_logit: float = 2.0,
    ) -> None:
        super().__init__(proportional_attention)
        if num_layers < 1 or num_patches < 1 or granularity < 1 or not 1 <= min_tokens <= num_patches:
            raise ValueError(
                "need num_layers >= 1, num_patches >= 1, granularity >= 1 and 1 <= min_tokens <= num_patches, got "
                f"{num_layers}, {num_patches}, {granularity}, {min_tokens}"
            )
        self.num_patches = num_patches
        candidates = torch.arange(num_patches, min_tokens - 1, -granularity, dtype=torch.float32)
        self.register_buffer("candidates", candidates, persistent=False)  # (C,) descending
        logits = torch.zeros(num_layers, len(candidates))
        logits[:, 0] = init_keep_logit
        self.prune_logits = nn.Parameter(logits.clone())
        self.merge_logits = nn.Parameter(logits.clone())
        self._schedule: list[tuple[int, int]] = []  # hard schedule of the running eval forward

    def expected_counts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-block (kept after pruning, kept after merging) counts: ceil-STE expectations, non-increasing."""
        prune = _ceil_ste(self.prune_logits.softmax(-1) @ self.candidates)  # (L,)
        merge = _ceil_ste(self.merge_logits.softmax(-1) @ self.candidates)
        kept_prune, kept_merge = [], []
        previous = self.candidates.new_tensor(float(self.num_patches))
        for layer in range(prune.shape[0]):
            k = torch.minimum(prune[layer], previous)
            m = torch.minimum(merge[layer], k)
            kept_prune.append(k)
            kept_merge.append(m)
            previous = m
        return kept_prune, kept_merge

    def schedule(self) -> list[tuple[int, int]]:
        """Hard ``(kept after prune, kept after merge)`` per block at the reference length."""
        prune, merge = self.expected_counts()
        return [(round(k.item()), round(m.item())) for k, m in zip(prune, merge)]

    def flops(self, model: VisionTransformerModel) -> torch.Tensor:
        """Differentiable block MACs at the reference length under the current rates."""
        return encoder_flops(model, self.num_patches, self.expected_counts()[1])

    def plan(self, index, metric, scores, num_protected, num_patches):
        keep, dest = self._schedule[index]
        if num_patches != self.num_patches:
            keep = max(1, round(keep * num_patches / self.num_patches))
            dest = max(1, round(dest * num_patches / self.num_patches))
        current = metric.shape[1] - num_protected
        keep, dest = min(keep, current), min(dest, keep, current)
        if dest == current:
            return None
        return importance_merge(metric, scores, keep, dest, num_protected)

    def _run_group(self, model, x, rotary, num_protected, collect, coords=None):
        if not self.training:
            with torch.no_grad():
                self._schedule = self.schedule()  # once per forward, not once per block
            return super()._run_group(model, x, rotary, num_protected, collect)
        if not model.config.use_cls_token:
            raise ValueError("DiffRateCompressor ranks tokens by CLS attention; the encoder needs use_cls_token")
        return self._search_group(model, x, rotary, num_protected, collect)

    def _search_group(self, model, x, rotary, num_protected, collect):
        """Differentiable search forward: fixed length, pruned/merged tokens masked out with straight-through masks."""
        batch, num_tokens, _ = x.shape
        num_patches = num_tokens - num_protected
        if num_patches != self.num_patches:
            raise ValueError(f"the rate search runs at the reference length {self.num_patches}, got {num_patches}")
        kept_prune, kept_merge = self.expected_counts()
        cand = self.candidates
        size = x.new_ones(batch, num_tokens)
        alive = x.new_ones(batch, num_tokens)
        arange = torch.arange(num_tokens, device=x.device).expand(batch, -1)
        source = arange
        protected = arange < num_protected
        intermediates = {}
        for index, block in enumerate(model.blocks):
            query, key, value, metric = _qkv(block.attn, block.norm1(x), rotary)
            logits = torch.einsum("bqhd,bkhd->bhqk", query, key) * query.shape[-1] ** -0.5
            weights = (logits - logits.amax(-1, keepdim=True).detach()).exp() * (size * alive)[:, None, None, :]
            probs = weights / weights.sum(-1, keepdim=True)  # masked softmax with proportional attention
            out = torch.einsum("bhqk,bkhd->bqhd", probs, value)
            x = _finish_block(block, x, block.attn.to_out(out.flatten(-2)))

            # rank unprotected live tokens by CLS attention (dead tokens last)
            importance = torch.where(alive.detach() > 0.5, probs[:, :, 0].mean(1).detach(), -1.0)
            order = importance[:, num_protected:].argsort(-1, descending=True)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(num_patches, device=x.device).expand(batch, -1)
            )
            rank = rank.float()  # (B, P) rank of every unprotected token
            prune_p, merge_p = self.prune_logits[index].softmax(-1), self.merge_logits[index].softmax(-1)
            keep_soft = ((rank[..., None] < cand).float() * prune_p).sum(-1)
            dest_soft = ((rank[..., None] < cand).float() * merge_p).sum(-1)
            keep_hard = (rank < kept_prune[index].detach()).float()
            dest_hard = (rank < kept_merge[index].detach()).float()
            keep = _ste(keep_hard, keep_soft)
            dest = _ste(dest_hard, dest_soft)
            is_dest = torch.cat([protected[:, :num_protected], dest_hard > 0.5], 1)  # (B, N)

            # every non-destination joins its most similar destination; weights carry the STE masks
            normed = F.normalize(metric.float(), dim=-1)
            similarity = (normed @ normed.transpose(1, 2)).masked_fill(~is_dest[:, None, :], -math.inf)
            similarity = similarity.masked_fill(protected[:, None, :], -math.inf)
            target = torch.where(is_dest, arange, similarity.argmax(-1))
            ones = x.new_ones(batch, num_protected)
            gate = torch.cat([ones, keep * torch.where(dest_hard > 0.5, dest, 1 - dest)], 1)
            weight = size * alive * gate
            numerator = torch.zeros_like(x).scatter_add(1, target[..., None].expand_as(x), x * weight[..., None])
            denominator = weight.new_zeros(batch, num_tokens).scatter_add(1, target, weight)
            x = torch.where(is_dest[..., None], numerator / denominator.clamp_min(1e-12)[..., None], x)
            size = torch.where(is_dest, denominator, size).clamp_min(1e-12)
            alive = alive * torch.cat([ones, keep * dest], 1)
            source = target.gather(1, source)
            x = _mlp(block, x)
            if index in collect:
                intermediates[index] = unmerge_tokens(x, source)
        self.last_kept = [round(m.item()) for m in kept_merge]
        return unmerge_tokens(x, source), intermediates


class ExpeditCompressor(TokenCompressor):
    """Expedit "hourglass" (Liang et al., NeurIPS 2022): parameter-free token clustering and reconstruction.

    After block ``location`` the patch tokens of each image are clustered from ``h x w`` to ``h' x w'`` by local soft
    k-means (centroids initialised by adaptive average pooling; a token may only join centroids within ``window``
    cells of its own cell on the centroid grid; ``n_iters`` rounds of ``softmax(-tau * ||x - c||^2)`` assignments and
    weighted means). The remaining blocks run on the centroids (CLS/registers kept aside, a centroid uses the RoPE
    position of the token at its cell centre). After the last block every original token is rebuilt as a convex
    combination of its ``k`` most similar final centroids, weighted by ``softmax(-reconstruction_tau * ||x - c||^2)``
    between its features before clustering and the centroids right after clustering.

    Args:
        location: block index after which tokens are clustered.
        grid_scale: ``h' = round(h * grid_scale)`` (same for ``w'``), used when ``output_grid`` is None.
        output_grid: fixed ``(h', w')`` cluster grid.
        n_iters: k-means iterations.
        tau: assignment sharpness.
        window: neighbourhood side on the centroid grid.
        k: centroids per token in the reconstruction.
        reconstruction_tau: reconstruction sharpness.
    """

    def __init__(
        self,
        location: int,
        grid_scale: float = 0.7,
        output_grid: tuple[int, int] | None = None,
        n_iters: int = 5,
        tau: float = 0.02,
        window: int = 5,
        k: int = 20,
        reconstruction_tau: float = 0.02,
    ) -> None:
        super().__init__(proportional_attention=False)
        if location < 0 or not 0 < grid_scale <= 1 or n_iters < 1 or window < 1 or k < 1:
            raise ValueError(
                "need location >= 0, 0 < grid_scale <= 1, n_iters >= 1, window >= 1, k >= 1, got "
                f"{location}, {grid_scale}, {n_iters}, {window}, {k}"
            )
        if output_grid is not None and (len(output_grid) != 2 or min(output_grid) < 1):
            raise ValueError(f"output_grid must be (rows, cols) >= 1, got {output_grid}")
        self.location, self.grid_scale, self.output_grid = location, grid_scale, output_grid
        self.n_iters, self.tau, self.window, self.k = n_iters, tau, window, k
        self.reconstruction_tau = reconstruction_tau

    def macs(self, model: VisionTransformerModel, num_patches: int) -> float:
        """Block MACs per image of the last forward: blocks up to ``location`` see every token (clustering follows the
        MLP, unlike the ToMe/DiffRate reductions), the others the clusters."""
        config, special = model.config, model.num_special_tokens
        total = 0.0
        for index, tokens in enumerate(self.last_kept):
            tokens = (num_patches if index <= self.location else tokens) + special
            total += block_flops(tokens, tokens, model.dim, config.mlp_hidden_dim, config.mlp_type)
        return total

    @staticmethod
    def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``(B, P, D)``, ``(B, M, D)`` -> ``(B, P, M)`` squared distances."""
        return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.transpose(1, 2) + c.pow(2).sum(-1)[:, None]).clamp_min(0)

    def _cluster(self, patches: torch.Tensor, coords: torch.Tensor):
        """Patch tokens ``(B, P, D)`` at ``coords`` ``(P, 2)`` -> centroids ``(B, M, D)``, window mask, centre index."""
        rows, cols = int(coords[:, 0].max()) + 1, int(coords[:, 1].max()) + 1
        if self.output_grid is not None:
            out_rows, out_cols = self.output_grid
        else:
            out_rows, out_cols = max(1, round(rows * self.grid_scale)), max(1, round(cols * self.grid_scale))
        out_rows, out_cols = min(out_rows, rows), min(out_cols, cols)
        batch, _, dim = patches.shape
        raster = patches.new_zeros(batch, rows * cols, dim)
        raster[:, coords[:, 0] * cols + coords[:, 1]] = patches
        grid = raster.transpose(1, 2).reshape(batch, dim, rows, cols)
        centroids = F.adaptive_avg_pool2d(grid, (out_rows, out_cols)).flatten(2).transpose(1, 2)  # (B, M, D)
        cell_r = (coords[:, 0] * out_rows) // rows  # (P,) centroid cell of every token
        cell_c = (coords[:, 1] * out_cols) // cols
        cent_r = torch.arange(out_rows, device=coords.device).repeat_interleave(out_cols)  # (M,)
        cent_c = torch.arange(out_cols, device=coords.device).repeat(out_rows)
        half = self.window // 2
        allowed = ((cell_r[:, None] - cent_r).abs() <= half) & ((cell_c[:, None] - cent_c).abs() <= half)  # (P, M)
        for _ in range(self.n_iters):
            logits = (-self.tau * self._sq_dist(patches, centroids)).masked_fill(~allowed, -math.inf)
            affinity = logits.softmax(-1)  # (B, P, M) each token over its allowed centroids
            centroids = (affinity.transpose(1, 2) @ patches) / affinity.sum(1)[..., None].clamp_min(1e-6)
        # the token at (or nearest to) each centroid's cell centre lends its RoPE position
        centre_r = ((cent_r.float() + 0.5) * rows / out_rows - 0.5).round().long()
        centre_c = ((cent_c.float() + 0.5) * cols / out_cols - 0.5).round().long()
        lookup = torch.full((rows * cols,), -1, dtype=torch.long, device=coords.device)
        lookup[coords[:, 0] * cols + coords[:, 1]] = torch.arange(len(coords), device=coords.device)
        centre = lookup[centre_r * cols + centre_c]
        return centroids, centre

    def _run_group(self, model, x, rotary, num_protected, collect, coords=None):
        if coords is None:
            raise ValueError("ExpeditCompressor needs the patch coordinates of the group")
        if int(coords[:, 0].max()) > 0:
            raise ValueError("ExpeditCompressor clusters single frames; disable attend_across_frames")
        if self.location >= len(model.blocks):
            raise ValueError(f"location {self.location} is outside [0, num_layers={len(model.blocks)})")
        coords = coords[:, 1:]
        intermediates: dict[int, torch.Tensor] = {}
        weights = None  # (B, P, M) reconstruction weights once clustered
        num_patches = x.shape[1] - num_protected

        def full_length(states: torch.Tensor) -> torch.Tensor:
            if weights is None:
                return states
            return torch.cat([states[:, :num_protected], weights @ states[:, num_protected:]], 1)

        for index, block in enumerate(model.blocks):
            x = block(x, rotary)
            if index == self.location and index < len(model.blocks) - 1:
                patches = x[:, num_protected:]
                centroids, centre = self._cluster(patches, coords)
                logits = -self.reconstruction_tau * self._sq_dist(patches, centroids)  # (B, P, M)
                top = logits.topk(min(self.k, centroids.shape[1]), dim=-1)
                weights = torch.zeros_like(logits).scatter_(-1, top.indices, top.values.softmax(-1))
                x = torch.cat([x[:, :num_protected], centroids], 1)
                if rotary is not None:
                    keep = torch.cat([torch.arange(num_protected, device=x.device), num_protected + centre])
                    rotary = tuple(table[:, keep] for table in rotary)
            if index in collect:
                intermediates[index] = full_length(x)
        self.last_kept = [
            num_patches if i < self.location else x.shape[1] - num_protected for i in range(len(model.blocks))
        ]  # tokens leaving each block
        return full_length(x), intermediates


def apply_token_compression(
    model: VisionTransformerModel,
    mode: str | TokenCompressor | None,
    *,
    r: int | list[int] = 0,
    num_patches: int | None = None,
    **kwargs,
) -> TokenCompressor | None:
    """Attach token compression to an encoder and return the compressor.

    Args:
        model: a :class:`genvis.encoders.VisionTransformerModel`.
        mode: ``"tome"`` (parameter-free, ``r`` per block), ``"diffrate"`` (learnable rates; search with
            :func:`search_diffrate`), ``"expedit"`` (parameter-free clustering + reconstruction; ``kwargs`` of
            :class:`ExpeditCompressor`), a ready compressor, or None to detach.
        r: ToMe tokens removed per block.
        num_patches: reference patch tokens per image (required for ``"diffrate"``; optional ToMe scaling).
        **kwargs: forwarded to the compressor's constructor.
    """
    if mode is None or isinstance(mode, TokenCompressor):
        compressor = mode
    elif mode == "tome":
        compressor = ToMeCompressor(r, reference_num_patches=num_patches, **kwargs)
    elif mode == "expedit":
        compressor = ExpeditCompressor(**kwargs)
    elif mode == "diffrate":
        if num_patches is None:
            raise ValueError("mode='diffrate' needs num_patches (the reference patch-token count per image)")
        compressor = DiffRateCompressor(model.config.num_layers, num_patches, **kwargs)
    else:
        raise ValueError(f"mode must be 'tome', 'diffrate', 'expedit', a TokenCompressor or None, got {mode!r}")
    if compressor is not None:
        compressor.to(model.device)
    model.set_token_compression(compressor)
    return compressor


def search_diffrate(
    model: VisionTransformerModel,
    compressor: DiffRateCompressor,
    batches: Iterable[torch.Tensor],
    target_flops_ratio: float,
    *,
    steps: int,
    lr: float = 0.05,
    flops_weight: float = 5.0,
    warmup_steps: int = 0,
    loss_fn: Callable[[torch.Tensor, object, object], torch.Tensor] | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Search the DiffRate rates off the shelf: the encoder stays frozen, only the rate logits train.

    The default objective distils the uncompressed encoder: ``(1 - cos)`` on patch tokens and on the pooled output.
    Loss = objective + ``flops_weight * (GFLOPs / target - 1)^2`` (0 weight during ``warmup_steps``).

    Args:
        model: the encoder (frozen during the search; its trainable flags and compressor attachment are restored).
        compressor: the :class:`DiffRateCompressor` whose logits train.
        batches: dense ``(B, C, H, W)`` image batches at the reference size (cycled).
        target_flops_ratio: target block MACs as a fraction of the uncompressed encoder, in (0, 1].
        steps: optimiser steps.
        lr: AdamW learning rate (cosine-decayed to lr / 10 as in DiffRate).
        flops_weight: lambda.
        warmup_steps: steps without the FLOP term.
        loss_fn: ``loss_fn(images, compressed_output, reference_output)``, replacing the distillation objective.
        progress: show a tqdm bar.

    Returns:
        Per-step logs (``loss``, ``task``, ``flops_ratio``).
    """
    if not 0 < target_flops_ratio <= 1:
        raise ValueError(f"target_flops_ratio must be in (0, 1], got {target_flops_ratio}")
    previous = model.__dict__.get("token_compression")
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    model.requires_grad_(False)
    full = float(encoder_flops(model, compressor.num_patches))
    optimizer = torch.optim.AdamW(compressor.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one image batch")
    logs = []
    compressor.train()
    for step in tqdm(range(steps), disable=not progress, desc="diffrate search"):
        images = batches[step % len(batches)]
        model.set_token_compression(None)
        with torch.no_grad():
            reference = model(images)
        model.set_token_compression(compressor)
        output = model(images)
        if loss_fn is not None:
            task = loss_fn(images, output, reference)
        else:
            task = (1 - F.cosine_similarity(output.patch_tokens, reference.patch_tokens, dim=-1)).mean()
            if reference.pooler_output is not None:
                task = task + (1 - F.cosine_similarity(output.pooler_output, reference.pooler_output, dim=-1)).mean()
        ratio = compressor.flops(model) / full
        weight = 0.0 if step < warmup_steps else flops_weight
        loss = task + weight * (ratio / target_flops_ratio - 1) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        logs.append({"loss": loss.item(), "task": task.item(), "flops_ratio": ratio.item()})
    compressor.eval()
    model.set_token_compression(previous)
    for name, param in model.named_parameters():
        param.requires_grad_(flags[name])
    return logs
