"""genvis.encoders.token_compression: ToMe / DiffRate on the shared ViT (identity, counts, packing, FLOPs, search)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from genvis.encoders import NativeResolutionProcessor, VisionTransformerModel
from genvis.encoders.token_compression import (
    DiffRateCompressor,
    ToMeCompressor,
    apply_token_compression,
    encoder_flops,
    search_diffrate,
)


def _encoder(**overrides):
    config = {
        "patch_size": 4,
        "num_layers": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "mlp_hidden_dim": 64,
        "num_register_tokens": 2,
    }
    config.update(overrides)
    torch.manual_seed(0)
    return VisionTransformerModel(**config).eval()


def _images(batch=3, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["tome", "diffrate_keep_all"])
def test_keep_all_is_identity(mode):
    model = _encoder()
    images = _images()
    reference = model(images, intermediate_layers=[1])
    if mode == "tome":
        apply_token_compression(model, "tome", r=0)
    else:
        compressor = apply_token_compression(model, "diffrate", num_patches=64, init_keep_logit=100.0)
        assert compressor.schedule() == [(64, 64)] * 4
    output = model(images, intermediate_layers=[1])
    torch.testing.assert_close(output.patch_tokens, reference.patch_tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.pooler_output, reference.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.intermediates[0], reference.intermediates[0], rtol=0, atol=1e-5)


def test_tome_counts_shapes_and_state_dict_unchanged():
    model = _encoder()
    keys = set(model.state_dict())
    compressor = apply_token_compression(model, "tome", r=[8, 8, 4, 0])
    output = model(_images())
    assert compressor.last_kept == [56, 48, 44, 44]
    assert output.patch_tokens.shape == (3 * 64, model.dim)  # dense outputs un-merged to full length
    assert set(model.state_dict()) == keys
    apply_token_compression(model, None)
    assert model.__dict__["token_compression"] is None


def test_compression_respects_packing():
    """Images of different sizes in one pack are compressed exactly as when encoded alone."""
    model = _encoder()
    processor = NativeResolutionProcessor(patch_size=4)
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 32, 32, generator=generator), torch.rand(3, 24, 40, generator=generator)]
    images.append(torch.rand(3, 32, 32, generator=generator))
    apply_token_compression(model, "tome", r=6, num_patches=64)
    packed = processor(images)
    together = model(packed.pixel_values, packed.grid_thw).patch_tokens
    alone = [model(*(lambda p: (p.pixel_values, p.grid_thw))(processor([image]))).patch_tokens for image in images]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_tome_keeps_features_close_to_uncompressed():
    model = _encoder()
    images = _images()
    reference = model(images).patch_tokens
    cosines = []
    for r in (4, 8, 12):
        apply_token_compression(model, "tome", r=r)
        cosines.append(F.cosine_similarity(model(images).patch_tokens, reference, dim=-1).mean().item())
    assert cosines[0] > cosines[-1] and cosines[0] > 0.85


def test_flops_estimator_closed_form():
    model = _encoder()
    n, c, h, s = 64, 32, 64, 3  # patches, width, MLP hidden, CLS + 2 registers
    block = 4 * (n + s) * c**2 + 2 * (n + s) ** 2 * c + 2 * (n + s) * c * h
    assert encoder_flops(model, n) == 4 * block
    kept = [40, 20, 20, 10]
    expected, current = 0, n
    for after in kept:
        expected += 4 * (current + s) * c**2 + 2 * (current + s) ** 2 * c + 2 * (after + s) * c * h
        current = after
    assert encoder_flops(model, n, kept) == expected


def test_diffrate_rates_learnable_and_search_forward_equals_hard():
    model = _encoder()
    images = _images()
    compressor = apply_token_compression(model, "diffrate", num_patches=64, granularity=4)
    compressor.train()
    output = model(images)
    loss = (1 - F.cosine_similarity(output.patch_tokens, model.blocks[0].norm1.weight[None], dim=-1)).mean()
    loss = loss + compressor.flops(model) / 1e6
    loss.backward()
    assert compressor.prune_logits.grad is not None and compressor.prune_logits.grad.abs().sum() > 0
    assert compressor.merge_logits.grad is not None and compressor.merge_logits.grad.abs().sum() > 0
    compressor.eval()
    with torch.no_grad():
        hard = model(images).patch_tokens
    torch.testing.assert_close(output.patch_tokens.detach(), hard, rtol=1e-4, atol=1e-4)
    assert compressor.last_kept == [m for _, m in compressor.schedule()]


@pytest.mark.parametrize("target", [0.6, 0.4])
def test_diffrate_search_meets_flops_target(target):
    model = _encoder()
    images = _images(batch=4)
    compressor = DiffRateCompressor(model.config.num_layers, 64, granularity=2)
    logs = search_diffrate(model, compressor, [images], target, steps=60, lr=0.05)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the frozen search
    full = encoder_flops(model, 64)
    achieved = encoder_flops(model, 64, [m for _, m in compressor.schedule()]) / full
    assert abs(achieved / target - 1) < 0.05, (achieved, logs[-1])
    schedule = compressor.schedule()
    assert all(m <= k for k, m in schedule) and all(b[1] <= a[1] for a, b in itertools.pairwise(schedule))
    model.set_token_compression(compressor)
    with torch.no_grad():
        compressed = model(images)
    assert compressor.last_kept == [m for _, m in schedule]
    model.set_token_compression(None)
    with torch.no_grad():
        reference = model(images)
    assert F.cosine_similarity(compressed.pooler_output, reference.pooler_output).mean() > 0.8


def test_bad_input():
    with pytest.raises(ValueError, match="mode"):
        apply_token_compression(_encoder(), "fast")
    with pytest.raises(ValueError, match="num_patches"):
        apply_token_compression(_encoder(), "diffrate")
    with pytest.raises(ValueError, match="r must be"):
        ToMeCompressor(-1)
    model = _encoder(use_cls_token=False, pooling_type="mean")
    apply_token_compression(model, "diffrate", num_patches=64)
    with pytest.raises(ValueError, match="use_cls_token"):
        model(_images())
    model = _encoder()
    model.set_token_compression(ToMeCompressor(2))
    with pytest.raises(ValueError, match="attention_layout"):
        model(_images(), attention_layout="padded")
    with pytest.raises(ValueError, match="target_flops_ratio"):
        search_diffrate(_encoder(), DiffRateCompressor(4, 64), [_images()], 1.5, steps=1)


def test_expedit_identity_and_reduction():
    model = _encoder()
    images = _images()
    reference = model(images, intermediate_layers=[0, 3])
    # grid_out = grid_in with sharp assignments: clustering and reconstruction are the identity
    apply_token_compression(model, "expedit", location=1, grid_scale=1.0, tau=100.0, reconstruction_tau=100.0)
    output = model(images)
    assert F.cosine_similarity(output.patch_tokens, reference.patch_tokens, dim=-1).min() > 0.99
    compressor = apply_token_compression(
        model, "expedit", location=1, grid_scale=0.5, tau=10.0, reconstruction_tau=10.0
    )
    output = model(images, intermediate_layers=[0, 3])
    assert compressor.last_kept == [64, 16, 16, 16]  # 8x8 -> 4x4 clusters after block 1
    assert output.patch_tokens.shape == reference.patch_tokens.shape
    torch.testing.assert_close(output.intermediates[0], reference.intermediates[0])  # before clustering: unchanged
    assert output.intermediates[1].shape == reference.intermediates[1].shape
    d, h, s = 32, 64, 3
    full, clustered = (4 * n * d**2 + 2 * n**2 * d + 2 * n * d * h for n in (64 + s, 16 + s))
    assert compressor.macs(model, 64) == 2 * full + 2 * clustered
    assert compressor.macs(model, 64) / encoder_flops(model, 64) < 0.7


def test_expedit_respects_packing_and_rope():
    model = _encoder()  # 2D RoPE: centroids take the position of the token at their cell centre
    processor = NativeResolutionProcessor(patch_size=4)
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 32, 32, generator=generator), torch.rand(3, 24, 40, generator=generator)]
    images.append(torch.rand(3, 40, 24, generator=generator))  # same token count as 24x40, other grid
    apply_token_compression(model, "expedit", location=0, grid_scale=0.5)
    packed = processor(images)
    together = model(packed.pixel_values, packed.grid_thw).patch_tokens
    alone = [model(*(lambda p: (p.pixel_values, p.grid_thw))(processor([image]))).patch_tokens for image in images]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    apply_token_compression(model, "expedit", location=4)
    with pytest.raises(ValueError, match="location"):
        model(_images())
