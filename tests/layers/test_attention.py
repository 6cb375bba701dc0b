import pytest
import torch
import torch.nn.functional as F

from genvis.layers import Attention, attention, cu_seqlens_from_lengths, pack_sequences, pad_packed


def _reference(query, key, value, is_causal=False):
    # plain per-sequence SDPA with explicit head repetition for GQA: (L, H, D) in and out
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None], is_causal=is_causal
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("is_causal", [False, True])
def test_packed_attention_equals_per_sequence(num_kv_heads, is_causal):
    lengths = [7, 1, 16, 3]
    queries = [torch.randn(n, 4, 8) for n in lengths]
    keys = [torch.randn(n, num_kv_heads, 8) for n in lengths]
    values = [torch.randn(n, num_kv_heads, 8) for n in lengths]
    q, cu = pack_sequences(queries)
    k, _ = pack_sequences(keys)
    v, _ = pack_sequences(values)
    out = attention(q, k, v, cu_seqlens=cu, is_causal=is_causal)
    expected = torch.cat([_reference(a, b, c, is_causal) for a, b, c in zip(queries, keys, values)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_equal_length_pack_takes_batched_path_and_matches():
    seqs = [torch.randn(6, 4, 8) for _ in range(3)]
    q, cu = pack_sequences(seqs)
    out = attention(q, q, q, cu_seqlens=cu, is_causal=True)
    expected = torch.cat([_reference(s, s, s, is_causal=True) for s in seqs])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_padded_with_key_mask_equals_packed():
    lengths = [5, 9, 2]
    q, cu = pack_sequences([torch.randn(n, 2, 16) for n in lengths])
    k, v = torch.randn_like(q), torch.randn_like(q)
    packed = attention(q, k, v, cu_seqlens=cu)
    qp, mask = pad_packed(q, cu)
    kp, _ = pad_packed(k, cu)
    vp, _ = pad_packed(v, cu)
    padded = attention(qp, kp, vp, attn_mask=mask)
    torch.testing.assert_close(padded[mask], packed, atol=1e-6, rtol=1e-5)


def test_attention_module_packed_equals_each_sequence_alone():
    torch.manual_seed(0)
    module = Attention(32, num_heads=4, num_kv_heads=2, qk_norm="rms")
    seqs = [torch.randn(n, 32) for n in (3, 11, 6)]
    packed, cu = pack_sequences(seqs)
    out = module(packed, cu_seqlens=cu)
    alone = torch.cat([module(s[None])[0] for s in seqs])
    torch.testing.assert_close(out, alone, atol=1e-6, rtol=1e-5)


def test_packed_cross_attention_isolated_per_sequence():
    module = Attention(16, num_heads=2, cross_attention_dim=8)
    xs = [torch.randn(n, 16) for n in (4, 2)]
    ctx = [torch.randn(n, 8) for n in (3, 5)]
    x, cu = pack_sequences(xs)
    c, cu_c = pack_sequences(ctx)
    out = module(x, c, cu_seqlens=cu, encoder_cu_seqlens=cu_c)
    alone = torch.cat([module(a[None], b[None])[0] for a, b in zip(xs, ctx)])
    torch.testing.assert_close(out, alone, atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(10, 4, 8)
    with pytest.raises(ValueError, match="end at the token count 10"):
        attention(q, q, q, cu_seqlens=cu_seqlens_from_lengths([3, 4]))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, q[:, :3], q[:, :3], cu_seqlens=cu_seqlens_from_lengths([10]))
    with pytest.raises(ValueError, match="positive"):
        cu_seqlens_from_lengths([3, 0])
    with pytest.raises(ValueError, match=r"\(B, S_k\)"):
        attention(q[None], q[None], q[None], attn_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(32, num_heads=4, num_kv_heads=3)
