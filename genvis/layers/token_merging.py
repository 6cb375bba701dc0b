"""Token merging and pruning on padded ``(B, N, D)`` token batches (ToMe, DiffRate-style importance prune + merge).

Every reduction is expressed as a :class:`TokenAssignment`: each input token points at the output slot it joins (its
own slot when kept, a destination's slot when merged, its most similar kept token's slot when pruned), and a
``dropped`` flag says whether it contributes to that slot's value. One merge routine (:func:`merge_tokens`) then does a
size-weighted average, so a token standing for ``k`` originals weighs ``k`` (Bolya et al., ToMe, arXiv 2210.09461), and
one gather (:func:`unmerge_tokens`) lifts reduced tokens back to the original positions for dense outputs.

- :func:`bipartite_soft_matching`: ToMe's alternating bipartite split; the ``r`` most similar source tokens merge into
  their best destination (parameter-free).
- :func:`importance_merge`: DiffRate (Chen et al., ICCV 2023): rank by an importance score (CLS attention), keep the top
  ``num_keep`` (prune the rest), the top ``num_dest`` of those are destinations, every other kept token merges into
  its most cosine-similar destination. ``num_dest == num_keep`` is pure top-k pruning.
- :func:`proportional_attention_bias`: ``log(size)`` added to attention logits, so a merged token is attended to as
  often as the originals it replaced.

The first ``num_protected`` tokens (CLS, registers) are never merged, pruned or used as destinations, and output
slots keep the input order (protected tokens stay first). Rows of a batch must reduce to the same count; run
sequences of different lengths (packed images) one group of equal lengths at a time. Tests:
tests/efficiency/test_token_merging.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "TokenAssignment",
    "bipartite_soft_matching",
    "compose_source",
    "importance_merge",
    "merge_tokens",
    "proportional_attention_bias",
    "unmerge_tokens",
]


@dataclass
class TokenAssignment:
    """Where every input token goes.

    Args:
        index: ``(B, N)`` long, output slot of each input token (always valid, also for dropped tokens so they can
            be reconstructed).
        dropped: ``(B, N)`` bool, True for pruned tokens (they do not contribute to the slot's value or size).
        representative: ``(B, M)`` long, the input token that defines each output slot (positions, RoPE tables).
    """

    index: torch.Tensor
    dropped: torch.Tensor
    representative: torch.Tensor

    @property
    def num_out(self) -> int:
        return int(self.representative.shape[1])


def _check_protected(num_tokens: int, num_protected: int) -> None:
    if not 0 <= num_protected <= num_tokens:
        raise ValueError(f"num_protected must be in [0, {num_tokens}] (the token count), got {num_protected}")


def _assignment_from_targets(target: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor) -> TokenAssignment:
    """``target``: (B, N) input index each token joins (itself when kept); ``kept``: (B, N) slots that survive."""
    counts = kept.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"every row must keep the same number of tokens, got {counts.tolist()}")
    slot_of_input = kept.long().cumsum(1) - 1  # (B, N) slot of each kept input token, in input order
    index = slot_of_input.gather(1, target)
    representative = kept.nonzero()[:, 1].reshape(kept.shape[0], -1)  # (B, M), ascending input order
    return TokenAssignment(index=index, dropped=dropped, representative=representative)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 0) -> TokenAssignment:
    """ToMe bipartite soft matching: merge ``r`` tokens per row into their most similar partner.

    Args:
        metric: ``(B, N, C)`` similarity features (ToMe: attention keys averaged over heads).
        r: tokens to remove; clamped to the number of source tokens ``ceil((N - num_protected) / 2)``.
        num_protected: leading tokens (CLS, registers) never merged.

    Returns:
        A :class:`TokenAssignment` with ``N - r`` output slots.
    """
    batch, num_tokens, _ = metric.shape
    _check_protected(num_tokens, num_protected)
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    arange = torch.arange(num_tokens, device=metric.device).expand(batch, -1)
    free = num_tokens - num_protected
    r = min(r, free // 2)
    if r == 0:
        kept = torch.ones(batch, num_tokens, dtype=torch.bool, device=metric.device)
        return _assignment_from_targets(arange, kept, torch.zeros_like(kept))
    metric = F.normalize(metric.float(), dim=-1)
    src_idx = torch.arange(num_protected, num_tokens, 2, device=metric.device)  # alternating split: A = even
    dst_idx = torch.arange(num_protected + 1, num_tokens, 2, device=metric.device)  # B = odd
    scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # (B, |A|, |B|) cosine
    best_score, best_dst = scores.max(dim=-1)  # (B, |A|)
    merged_src = best_score.argsort(dim=-1, descending=True)[:, :r]  # (B, r) positions in A
    target = arange.clone()
    target.scatter_(1, src_idx[merged_src], dst_idx[best_dst.gather(1, merged_src)])
    kept = torch.ones(batch, num_tokens, dtype=torch.bool, device=metric.device)
    kept.scatter_(1, src_idx[merged_src], False)
    return _assignment_from_targets(target, kept, torch.zeros_like(kept))


def importance_merge(
    metric: torch.Tensor, scores: torch.Tensor, num_keep: int, num_dest: int, num_protected: int = 0
) -> TokenAssignment:
    """DiffRate prune + merge: keep the ``num_keep`` most important tokens, merge all but the top ``num_dest``.

    Args:
        metric: ``(B, N, C)`` similarity features.
        scores: ``(B, N)`` importance (higher is kept first), e.g. CLS attention averaged over heads.
        num_keep: unprotected tokens that survive pruning.
        num_dest: unprotected tokens that survive merging (``<= num_keep``); the other kept tokens merge into their
            most cosine-similar destination, pruned tokens are dropped (and reconstructed from their most similar
            destination by :func:`unmerge_tokens`).
        num_protected: leading tokens never pruned or merged.

    Returns:
        A :class:`TokenAssignment` with ``num_protected + num_dest`` output slots.
    """
    batch, num_tokens, _ = metric.shape
    _check_protected(num_tokens, num_protected)
    free = num_tokens - num_protected
    if not 0 < num_dest <= num_keep <= free:
        raise ValueError(
            f"need 0 < num_dest <= num_keep <= {free} (unprotected tokens), got num_dest={num_dest}, num_keep={num_keep}"
        )
    if scores.shape != (batch, num_tokens):
        raise ValueError(f"scores must be (B, N) = {(batch, num_tokens)}, got {tuple(scores.shape)}")
    order = scores[:, num_protected:].argsort(dim=-1, descending=True) + num_protected  # (B, free)
    arange = torch.arange(num_tokens, device=metric.device).expand(batch, -1)
    is_dest = torch.zeros(batch, num_tokens, dtype=torch.bool, device=metric.device)
    is_dest[:, :num_protected] = True
    is_dest.scatter_(1, order[:, :num_dest], True)
    dropped = torch.zeros_like(is_dest)
    dropped.scatter_(1, order[:, num_keep:], True)
    if num_dest == free:
        return _assignment_from_targets(arange, is_dest, dropped)
    metric = F.normalize(metric.float(), dim=-1)
    dest_idx = order[:, :num_dest]  # (B, num_dest)
    dest_metric = metric.gather(1, dest_idx[..., None].expand(-1, -1, metric.shape[-1]))
    nearest = (metric @ dest_metric.transpose(1, 2)).argmax(-1)  # (B, N) best destination of every token
    target = torch.where(is_dest, arange, dest_idx.gather(1, nearest))
    return _assignment_from_targets(target, is_dest, dropped)


def merge_tokens(
    x: torch.Tensor, assignment: TokenAssignment, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens joining each output slot.

    Args:
        x: ``(B, N, D)`` tokens.
        assignment: from :func:`bipartite_soft_matching` or :func:`importance_merge`.
        size: ``(B, N)`` originals represented by each token (default ones).

    Returns:
        ``(B, M, D)`` merged tokens and their ``(B, M)`` sizes. The size-weighted mean over non-dropped tokens is
        preserved exactly.
    """
    batch, num_tokens, dim = x.shape
    if assignment.index.shape != (batch, num_tokens):
        raise ValueError(f"assignment is for {tuple(assignment.index.shape)} tokens, x has {(batch, num_tokens)}")
    if size is None:
        size = x.new_ones(batch, num_tokens)
    weight = size.to(x.dtype) * (~assignment.dropped).to(x.dtype)  # (B, N)
    num_out = assignment.num_out
    new_size = weight.new_zeros(batch, num_out).scatter_add(1, assignment.index, weight)
    total = x.new_zeros(batch, num_out, dim).scatter_add(
        1, assignment.index[..., None].expand(-1, -1, dim), x * weight[..., None]
    )
    return total / new_size.clamp_min(torch.finfo(x.dtype).tiny)[..., None], new_size


def compose_source(source: torch.Tensor, assignment: TokenAssignment) -> torch.Tensor:
    """Update the ``(B, N0)`` map original token -> current slot after one more reduction."""
    return assignment.index.gather(1, source)


def unmerge_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Lift ``(B, M, D)`` reduced tokens back to the ``(B, N0, D)`` original positions (each copies its slot)."""
    return x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))


def proportional_attention_bias(size: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, N)`` sizes -> ``(B, 1, 1, N)`` additive ``log(size)`` logits bias (zero where every size is 1)."""
    return size.log().to(dtype or size.dtype)[:, None, None, :]
