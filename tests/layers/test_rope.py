import pytest
import torch

from genvis.layers import RotaryEmbedding, apply_rotary_emb, grid_position_ids


@pytest.mark.parametrize("axes_dim", [[16], [8, 8], [4, 6, 6]])
@pytest.mark.parametrize("interleaved", [False, True])
def test_score_depends_only_on_relative_position(axes_dim, interleaved):
    rope = RotaryEmbedding(16, axes_dim, interleaved=interleaved)
    n_axes = len(axes_dim)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)  # (S=1, H=1, D)

    def score(pos_q, pos_k):
        cq, sq = rope(torch.tensor([pos_q]))
        ck, sk = rope(torch.tensor([pos_k]))
        return (apply_rotary_emb(q, cq, sq, interleaved) * apply_rotary_emb(k, ck, sk, interleaved)).sum()

    base_q, base_k = [3] * n_axes, list(range(1, n_axes + 1))
    shift = [5, -2, 7][:n_axes]
    shifted_q = [a + s for a, s in zip(base_q, shift)]
    shifted_k = [a + s for a, s in zip(base_k, shift)]
    torch.testing.assert_close(score(base_q, base_k), score(shifted_q, shifted_k), atol=1e-5, rtol=1e-5)
    # a different offset on one axis must change the score (the embedding is not a no-op)
    moved_k = list(base_k)
    moved_k[0] += 3
    assert not torch.allclose(score(base_q, base_k), score(base_q, moved_k), atol=1e-4)


def test_rotation_preserves_norm_and_zero_position_is_identity():
    rope = RotaryEmbedding(12, [4, 4, 4])
    x = torch.randn(20, 3, 12)
    cos, sin = rope(grid_position_ids((1, 4, 5)))
    rotated = apply_rotary_emb(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    cos0, sin0 = rope(torch.zeros(20, 3, dtype=torch.long))
    torch.testing.assert_close(apply_rotary_emb(x, cos0, sin0), x)


def test_grid_position_ids_row_major():
    ids = grid_position_ids((2, 2, 3))
    assert ids.shape == (12, 3)
    assert ids[0].tolist() == [0, 0, 0] and ids[4].tolist() == [0, 1, 1] and ids[-1].tolist() == [1, 1, 2]


def test_bad_rope_config():
    with pytest.raises(ValueError, match="sum to head_dim"):
        RotaryEmbedding(16, [6, 6])
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(10, [5, 5])
    with pytest.raises(ValueError, match="number of axes"):
        RotaryEmbedding(16, [8, 8])(torch.zeros(4, 3))
