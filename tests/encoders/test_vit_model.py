"""VisionTransformerModel: packed == alone == padded, registers, intermediates, save/load, gradients, bad input."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from genvis.encoders import NativeResolutionProcessor, VisionTransformerModel, tokens_to_grids
from genvis.encoders.vit import VisionTransformerBlock, VisionTransformerMAPHead, VisionTransformerPatchMerger

TINY = {"patch_size": 8, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "mlp_hidden_dim": 32}
VARIANTS = {
    "rope_cls_registers": {"num_register_tokens": 3},
    "learned_dinov2_like": {
        "position_embedding_type": "learned",
        "pos_embed_grid_size": [4, 4],
        "pos_embed_cls": True,
        "pos_embed_antialias": True,
        "num_register_tokens": 2,
        "layer_scale_init_value": 0.5,
    },
    "naflex_map_head": {
        "position_embedding_type": "learned",
        "pos_embed_grid_size": [4, 4],
        "pos_embed_interpolation": "bilinear",
        "use_cls_token": False,
        "pooling_type": "map",
        "mlp_type": "gelu_tanh",
    },
    "qwen25_like_windows_merger": {
        "use_cls_token": False,
        "pooling_type": "mean",
        "final_norm": "none",
        "norm_type": "rms",
        "mlp_type": "swiglu",
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "merger_out_dim": 24,
        "window_size": 4,
        "full_attention_layers": [1],
    },
    "video_clip_segments": {"attend_across_frames": True, "pooling_type": "mean", "num_register_tokens": 1},
}


def _model(**overrides) -> VisionTransformerModel:
    torch.manual_seed(0)
    model = VisionTransformerModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # non-trivial registers/tokens so ordering bugs show
        for name, param in model.named_parameters():
            if name in ("register_tokens", "cls_token", "mask_token"):
                param.normal_()
    return model


def _items():
    generator = torch.Generator().manual_seed(0)
    return [
        torch.rand(3, 32, 48, generator=generator),
        torch.rand(3, 64, 16, generator=generator),
        torch.rand(3, 3, 32, 32, generator=generator),  # a 3-frame clip
        torch.rand(3, 16, 16, generator=generator),
    ]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_batch_equals_each_item_alone_and_padded(variant):
    model = _model(**VARIANTS[variant])
    processor = NativeResolutionProcessor.from_model(model)
    items = _items()
    packed = processor(items)
    with torch.no_grad():
        batch = model(packed.pixel_values, packed.grid_thw, intermediate_layers=[0])
        if model.config.window_size is None:
            padded = model(packed.pixel_values, packed.grid_thw, attention_layout="padded", intermediate_layers=[0])
            torch.testing.assert_close(padded.patch_tokens, batch.patch_tokens, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded.intermediates[0], batch.intermediates[0], atol=1e-5, rtol=1e-5)
            if batch.pooler_output is not None:
                torch.testing.assert_close(padded.pooler_output, batch.pooler_output, atol=1e-5, rtol=1e-5)
        starts = batch.cu_seqlens.tolist()
        segment_starts = 0
        for index, item in enumerate(items):
            single = processor([item])
            alone = model(single.pixel_values, single.grid_thw, intermediate_layers=[0])
            tokens = batch.patch_tokens[starts[index] : starts[index + 1]]
            torch.testing.assert_close(alone.patch_tokens, tokens, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                alone.intermediates[0], batch.intermediates[0][starts[index] : starts[index + 1]], atol=1e-5, rtol=1e-5
            )
            num_segments = alone.segment_cu_seqlens.numel() - 1
            segments = slice(segment_starts, segment_starts + num_segments)
            segment_starts += num_segments
            if batch.pooler_output is not None:
                torch.testing.assert_close(alone.pooler_output, batch.pooler_output[segments], atol=1e-5, rtol=1e-5)
            if batch.register_tokens is not None:
                torch.testing.assert_close(
                    alone.register_tokens, batch.register_tokens[segments], atol=1e-5, rtol=1e-5
                )
            if batch.merged_tokens is not None:
                merged = batch.merged_tokens[starts[index] // 4 : starts[index + 1] // 4]
                torch.testing.assert_close(alone.merged_tokens, merged, atol=1e-5, rtol=1e-5)


def test_token_groups_and_registers_are_stripped_from_dense_outputs():
    model = _model(num_register_tokens=3)
    images = torch.rand(2, 3, 32, 24)  # 4 x 3 patches
    with torch.no_grad():
        out = model(images, intermediate_layers=2)
    assert out.last_hidden_state.shape == (2 * (1 + 3 + 12), 32)
    assert out.patch_tokens.shape == (24, 32)
    assert out.cls_token.shape == (2, 32) and out.register_tokens.shape == (2, 3, 32)
    assert len(out.intermediates) == 2 and out.intermediates[0].shape == (24, 32)
    # sequence order per image is [CLS, registers, patches]
    torch.testing.assert_close(out.last_hidden_state[:1], out.cls_token[:1])
    torch.testing.assert_close(out.last_hidden_state[1:4], out.register_tokens[0])
    torch.testing.assert_close(out.last_hidden_state[4:16], out.patch_tokens[:12])
    # registers change the patch features (they take part in attention)
    no_registers = _model(num_register_tokens=0)
    no_registers.load_state_dict({k: v for k, v in model.state_dict().items() if k != "register_tokens"})
    with torch.no_grad():
        assert not torch.allclose(no_registers(images).patch_tokens, out.patch_tokens, atol=1e-4)

    features, grids = model.forward_intermediates(images, indices=[-1], output_fmt="grid", norm=True)
    assert grids[0][0].shape == (1, 4, 3, 32)
    torch.testing.assert_close(grids[0][1].reshape(12, 32), features.patch_tokens[12:])


def test_merge_blocking_round_trips_to_raster_maps():
    model = _model(use_cls_token=False, pooling_type="none", spatial_merge_size=2)
    image = torch.rand(3, 32, 64)
    plain = _model(use_cls_token=False, pooling_type="none", spatial_merge_size=1)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        rows = NativeResolutionProcessor.from_model(model, image_mean=None, image_std=None)([image]).pixel_values
        blocked = model(rows, torch.tensor([[1, 4, 8]]))
        raster = plain(image[None])
    # same model, different token order: un-blocking gives the raster map
    torch.testing.assert_close(
        model.patch_grids(blocked)[0].reshape(32, -1), raster.patch_tokens, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        tokens_to_grids(raster.patch_tokens, raster.grid_thw)[0].reshape(32, -1), raster.patch_tokens
    )


def test_save_load_roundtrip_and_every_parameter_gets_a_gradient(tmp_path):
    model = _model(**VARIANTS["qwen25_like_windows_merger"])
    model.save_pretrained(tmp_path)
    loaded = VisionTransformerModel.from_pretrained(tmp_path).eval()
    packed = NativeResolutionProcessor.from_model(model)(_items())
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(packed.pixel_values, packed.grid_thw).merged_tokens,
            model(packed.pixel_values, packed.grid_thw).merged_tokens,
            atol=0,
            rtol=0,
        )
    for variant in ("learned_dinov2_like", "naflex_map_head", "qwen25_like_windows_merger"):
        model = _model(**VARIANTS[variant]).train()
        packed = NativeResolutionProcessor.from_model(model)(_items())
        out = model(packed.pixel_values, packed.grid_thw)
        loss = out.patch_tokens.square().mean() + out.pooler_output.square().mean()
        if out.merged_tokens is not None:
            loss = loss + out.merged_tokens.square().mean()
        if out.register_tokens is not None:
            loss = loss + out.register_tokens.square().mean()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"{variant}: no gradient for {missing}"


def test_gradient_checkpointing_matches_and_bf16_is_finite():
    model = _model(**VARIANTS["rope_cls_registers"]).train()
    packed = NativeResolutionProcessor.from_model(model)(_items())
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(packed.pixel_values, packed.grid_thw).patch_tokens.sum().backward()
        grads.append(model.blocks[0].attn.to_q.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    with torch.no_grad():
        out = model.to(torch.bfloat16)(packed.pixel_values.bfloat16(), packed.grid_thw)
    assert out.patch_tokens.dtype == torch.bfloat16 and torch.isfinite(out.patch_tokens).all()


def test_mask_token_replaces_masked_patches():
    model = _model(use_mask_token=True)
    images = torch.rand(1, 3, 16, 16)
    mask = torch.tensor([True, False, False, False])
    with torch.no_grad():
        masked = model(images, patch_mask=mask).patch_tokens
        other = model(torch.rand(1, 3, 16, 16), patch_mask=mask).patch_tokens
        plain = model(images).patch_tokens
    assert not torch.allclose(masked, plain)
    # the masked patch's own content no longer matters: changing only that patch changes nothing
    images2 = images.clone()
    images2[..., :8, :8] = 5.0
    with torch.no_grad():
        torch.testing.assert_close(model(images2, patch_mask=mask).patch_tokens, masked)
    assert not torch.allclose(other, masked)


def test_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"in_channels=3 channels at dim 1, got 4"):
        model(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"4x16 pixels is smaller than one 8x8 patch"):
        model(torch.rand(1, 3, 4, 16))
    with pytest.raises(ValueError, match=r"multiple of patch_size \* merge_size = 8"):
        model(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"need grid_thw"):
        model(torch.rand(4, 192))
    with pytest.raises(ValueError, match=r"C\*pt\*p\*p = 192 .* got 191"):
        model(torch.rand(4, 191), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match=r"grid_thw covers 4 patches but pixel_values has 5 rows"):
        model(torch.rand(5, 192), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match=r"attention_layout must be"):
        model(torch.rand(1, 3, 16, 16), attention_layout="dense")
    with pytest.raises(ValueError, match=r"block index 5 is outside"):
        model(torch.rand(1, 3, 16, 16), intermediate_layers=[5])
    merged = _model(use_cls_token=False, pooling_type="none", spatial_merge_size=2)
    with pytest.raises(ValueError, match=r"multiples of spatial_merge_size=2"):
        merged(torch.rand(6, 192), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"pooling_type='cls' needs use_cls_token=True"):
        VisionTransformerModel(**TINY, use_cls_token=False)
    with pytest.raises(ValueError, match=r"mlp_type must be one of"):
        VisionTransformerModel(**TINY, mlp_type="relu")
    with pytest.raises(ValueError, match=r"pos_embed_grid_size must be \[h, w\]"):
        VisionTransformerModel(**TINY, position_embedding_type="learned")


@pytest.mark.parametrize(
    "cls", [VisionTransformerModel, VisionTransformerBlock, VisionTransformerMAPHead, VisionTransformerPatchMerger]
)
def test_every_init_argument_is_documented(cls):
    documented = set(re.findall(r"^\s{8}(\w+):", (inspect.getdoc(cls) and cls.__doc__) or "", flags=re.MULTILINE))
    arguments = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert arguments <= documented, f"{cls.__name__}: undocumented {sorted(arguments - documented)}"
