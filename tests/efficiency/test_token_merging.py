"""genvis.layers.token_merging: ToMe bipartite matching, DiffRate importance prune + merge, unmerge."""

import pytest
import torch
import torch.nn.functional as F

from genvis.layers.token_merging import (
    bipartite_soft_matching,
    compose_source,
    importance_merge,
    merge_tokens,
    proportional_attention_bias,
    unmerge_tokens,
)


def _tokens(batch=3, num=17, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num, dim, generator=generator)


def test_bipartite_r0_is_identity():
    x = _tokens()
    assignment = bipartite_soft_matching(x, 0, num_protected=1)
    merged, size = merge_tokens(x, assignment)
    torch.testing.assert_close(merged, x)
    assert torch.equal(size, torch.ones(3, 17))
    assert torch.equal(unmerge_tokens(merged, compose_source(torch.arange(17).expand(3, -1), assignment)), x)


@pytest.mark.parametrize("r", [1, 5, 8, 100])
def test_bipartite_count_and_size_weighted_mean(r):
    x = _tokens()
    size = torch.rand(3, 17) + 0.5
    assignment = bipartite_soft_matching(x, r, num_protected=1)
    merged, new_size = merge_tokens(x, assignment, size)
    expected = 17 - min(r, 16 // 2)
    assert merged.shape == (3, expected, 8) and new_size.shape == (3, expected)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))  # total size conserved
    mean_before = (x * size[..., None]).sum(1) / size.sum(1, keepdim=True)
    mean_after = (merged * new_size[..., None]).sum(1) / new_size.sum(1, keepdim=True)
    torch.testing.assert_close(mean_after, mean_before)  # size-weighted mean preserved exactly
    torch.testing.assert_close(merged[:, 0], x[:, 0])  # protected CLS untouched and first


def test_bipartite_merges_most_similar_pair():
    x = _tokens(batch=1, num=6, dim=4)
    x[0, 3] = x[0, 2] * 2.0  # cosine 1 between source 2 (even slot) and destination 3
    assignment = bipartite_soft_matching(x, 1, num_protected=0)
    merged, size = merge_tokens(x, assignment)
    assert assignment.index[0, 2] == assignment.index[0, 3]
    slot = assignment.index[0, 3]
    torch.testing.assert_close(merged[0, slot], (x[0, 2] + x[0, 3]) / 2)
    assert size[0, slot] == 2


def test_importance_merge_prune_and_merge_counts():
    x = _tokens(num=21)
    scores = torch.rand(3, 21)
    assignment = importance_merge(x, scores, num_keep=14, num_dest=9, num_protected=2)
    merged, size = merge_tokens(x, assignment)
    assert merged.shape == (3, 2 + 9, 8)
    assert int(assignment.dropped.sum(1)[0]) == 21 - 2 - 14
    torch.testing.assert_close(size.sum(1), torch.full((3,), 2.0 + 14))  # pruned tokens do not count
    # the destinations are the top-9 scored unprotected tokens, kept in input order
    top = scores[:, 2:].topk(9, dim=-1).indices + 2
    assert torch.equal(assignment.representative[:, 2:], top.sort(-1).values)
    # every token (also a pruned one) reconstructs from a slot; destinations round-trip exactly
    restored = unmerge_tokens(merged, assignment.index)
    assert restored.shape == x.shape
    is_dest = torch.zeros(3, 21, dtype=torch.bool).scatter_(1, top, True)
    unmerged_dest = restored[is_dest & (size.gather(1, assignment.index) == 1)]
    assert torch.allclose(unmerged_dest, x[is_dest & (size.gather(1, assignment.index) == 1)])


def test_importance_prune_only_keeps_top_k():
    x = _tokens(num=10)
    scores = torch.arange(10.0).expand(3, -1)
    merged, size = merge_tokens(x, importance_merge(x, scores, num_keep=4, num_dest=4, num_protected=1))
    torch.testing.assert_close(merged, x[:, [0, 6, 7, 8, 9]])
    assert torch.equal(size, torch.ones(3, 5))


def test_bad_arguments():
    x = _tokens()
    with pytest.raises(ValueError, match="num_protected"):
        bipartite_soft_matching(x, 1, num_protected=20)
    with pytest.raises(ValueError, match="num_dest"):
        importance_merge(x, torch.rand(3, 17), num_keep=3, num_dest=5, num_protected=1)
    with pytest.raises(ValueError, match="scores"):
        importance_merge(x, torch.rand(3, 5), num_keep=5, num_dest=3)


def test_proportional_attention_with_unit_sizes_is_plain_attention():
    q, k, v = (torch.randn(2, 2, 7, 4) for _ in range(3))
    bias = proportional_attention_bias(torch.ones(2, 7))
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias), F.scaled_dot_product_attention(q, k, v)
    )
    # a token of size 2 weighs as two copies of itself
    size = torch.ones(2, 7)
    size[:, 3] = 2
    k2, v2 = torch.cat([k, k[:, :, 3:4]], 2), torch.cat([v, v[:, :, 3:4]], 2)
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=proportional_attention_bias(size)),
        F.scaled_dot_product_attention(q, k2, v2),
    )
