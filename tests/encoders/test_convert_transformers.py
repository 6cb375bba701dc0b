"""Conformance of genvis.encoders.convert_transformers against random-init transformers references.

Each test builds a tiny reference from the installed transformers, randomises every weight (zero/one-initialised ones
included: registers, mask token, biases, LayerScale, norms), saves it with ``save_pretrained``, imports it into genvis
and compares fp32 outputs (max |diff| <= 1e-5), including packed mixed-resolution batches.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip("conformance is pinned to transformers 5.x output types and names", allow_module_level=True)

from safetensors.torch import load_file, save_file  # noqa: E402

from genvis.encoders import NativeResolutionProcessor  # noqa: E402
from genvis.encoders.convert_transformers import load_transformers_vision_model  # noqa: E402

ATOL = 1e-5


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_scale = name.endswith("weight") and param.ndim == 1  # norm gains
            param.copy_(1.0 + 0.1 * noise if is_scale else 0.1 * noise)
    return model.eval()


def _save(model, tmp_path, name="ref"):
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| {diff:.2e} > {ATOL}"


def _mixed_images(sizes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


def _packed(model, images):
    processor = NativeResolutionProcessor.from_model(model, image_mean=None, image_std=None)
    return processor(images)


@pytest.mark.parametrize("family", ["vit", "clip", "dinov2_reg", "dinov2_reg_swiglu"])
def test_absolute_position_vits_match_reference(family, tmp_path):
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    if family == "vit":
        reference = transformers.ViTModel(transformers.ViTConfig(intermediate_size=64, **common))
    elif family == "clip":
        reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=64, **common))
    else:
        swiglu = family.endswith("swiglu")
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=3, use_swiglu_ffn=swiglu, **common)
        reference = transformers.Dinov2WithRegistersModel(config)
    _randomize(reference)
    model = load_transformers_vision_model(_save(reference, tmp_path))

    # native size, dense batch: the whole sequence and the pooled output
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=images)
        ours = model(images)
    _close(ours.last_hidden_state, expected.last_hidden_state.reshape(-1, 32), f"{family} last_hidden_state")
    _close(ours.pooler_output, expected.pooler_output, f"{family} pooler_output")

    # mixed resolutions in one packed batch vs the reference run per image with interpolated positions
    sizes = [(24, 40), (48, 32), (32, 32), (16, 8)]
    images = _mixed_images(sizes)
    packed = _packed(model, images)
    with torch.no_grad():
        ours = model(packed.pixel_values, packed.grid_thw)
        starts = ours.cu_seqlens.tolist()
        for index, image in enumerate(images):
            expected = reference(pixel_values=image[None], interpolate_pos_encoding=True)
            num_special = 1 + (3 if family.startswith("dinov2") else 0)
            patches = expected.last_hidden_state[0, num_special:]
            what = f"{family} packed image {index} {sizes[index]}"
            if family == "clip":  # CLIP's last_hidden_state is before post_layernorm
                _close(
                    ours.last_hidden_state[ours.cu_seqlens[index] + index * num_special :][:1],
                    expected.last_hidden_state[0, :1],
                    what,
                )
                _close(ours.pooler_output[index], expected.pooler_output[0], what + " pooled")
                continue
            _close(ours.patch_tokens[starts[index] : starts[index + 1]], patches, what)
            _close(ours.cls_token[index], expected.last_hidden_state[0, 0], what + " cls")
            if num_special > 1:
                _close(ours.register_tokens[index], expected.last_hidden_state[0, 1:num_special], what + " registers")
            _close(ours.pooler_output[index], expected.pooler_output[0], what + " pooled")


def test_siglip2_naflex_matches_reference_padded_batch(tmp_path):
    config = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8, num_patches=16
    )
    reference = _randomize(transformers.Siglip2VisionModel(config))
    model = load_transformers_vision_model(_save(reference, tmp_path))
    sizes = [(40, 72), (56, 24), (32, 32)]  # grids 5x9 (upsampled pos grid), 7x3, 4x4 (native)
    images = _mixed_images(sizes)
    packed = _packed(model, images)

    # reference input: (ph, pw, C) patch vectors, zero-padded to one length with a mask and spatial shapes
    max_len = max(h * w for h, w in [(s[0] // 8, s[1] // 8) for s in sizes])
    pixel_values = torch.zeros(len(images), max_len, 3 * 64)
    mask = torch.zeros(len(images), max_len, dtype=torch.long)
    for index, image in enumerate(images):
        h, w = image.shape[1] // 8, image.shape[2] // 8
        rows = image.reshape(3, h, 8, w, 8).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
        pixel_values[index, : h * w], mask[index, : h * w] = rows, 1
    spatial_shapes = torch.tensor([[s[0] // 8, s[1] // 8] for s in sizes])
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=spatial_shapes)
        ours = model(packed.pixel_values, packed.grid_thw)
    starts = ours.cu_seqlens.tolist()
    for index in range(len(images)):
        length = starts[index + 1] - starts[index]
        _close(
            ours.patch_tokens[starts[index] : starts[index + 1]],
            expected.last_hidden_state[index, :length],
            f"siglip2 image {index}",
        )
    _close(ours.pooler_output, expected.pooler_output, "siglip2 MAP pooler")


def _qwen_inputs(model):
    # an image (replicated to 2 frames) and a 4-frame clip, one packed sequence, block-major rows
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(3, 8 * 10, 8 * 6, generator=generator)  # 10 x 6 patches: partial windows
    video = torch.randn(4, 3, 8 * 4, 8 * 8, generator=generator)  # t=2, 4 x 8 patches
    return _packed(model, [image, video])


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_towers_match_reference(version, tmp_path):
    if version == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=4, patch_size=8)
        reference = Qwen2VisionTransformerPretrainedModel._from_config(config)
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        config = Qwen2_5_VLVisionConfig(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            patch_size=8,
            out_hidden_size=48,
            window_size=32,
            fullatt_block_indexes=[1],
        )  # window 32 px = 2 merged units = 4x4 patches
        reference = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
    _randomize(reference)
    model = load_transformers_vision_model(_save(reference, tmp_path))
    packed = _qwen_inputs(model)
    with torch.no_grad():
        expected = reference(packed.pixel_values, grid_thw=packed.grid_thw)
        ours = model(packed.pixel_values, packed.grid_thw)
    reference_tokens = expected.last_hidden_state
    if version == "qwen2_5_vl":  # the reference returns tokens in window order; restore packing order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(packed.grid_thw, 2, 32, 8)
        units = reference_tokens.reshape(-1, 4, reference_tokens.shape[-1])
        reference_tokens = units[torch.argsort(window_index)].reshape(-1, reference_tokens.shape[-1])
    _close(ours.patch_tokens, reference_tokens, f"{version} tokens")
    _close(ours.merged_tokens, expected.pooler_output, f"{version} merged tokens")

    # packing invariance against the reference run per item
    starts = ours.cu_seqlens.tolist()
    merged_starts = [s // 4 for s in starts]
    for index in range(2):
        rows = packed.pixel_values[starts[index] : starts[index + 1]]
        with torch.no_grad():
            alone = reference(rows, grid_thw=packed.grid_thw[index : index + 1]).pooler_output
        _close(ours.merged_tokens[merged_starts[index] : merged_starts[index + 1]], alone, f"{version} item {index}")


def test_prefixed_and_composite_checkpoints_load(tmp_path):
    config = transformers.CLIPConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 99,
        },
        projection_dim=16,
    )
    reference = _randomize(transformers.CLIPModel(config))
    folder = _save(reference, tmp_path)
    assert any(k.startswith("vision_model.") for k in load_file(str(folder / "model.safetensors")))
    model = load_transformers_vision_model(folder)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference.vision_model(pixel_values=images).pooler_output
        _close(model(images).pooler_output, expected, "CLIPModel vision_model.* pooled")

    # a bare vision checkpoint re-saved under "visual." (Qwen-style full-model prefix)
    vit = _randomize(
        transformers.ViTModel(
            transformers.ViTConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=16,
                patch_size=8,
            )
        )
    )
    folder = _save(vit, tmp_path, "vit")
    state = load_file(str(folder / "model.safetensors"))
    save_file({f"visual.{k}": v for k, v in state.items()}, str(folder / "model.safetensors"))
    with torch.no_grad():
        _close(
            load_transformers_vision_model(folder)(torch.ones(1, 3, 16, 16)).pooler_output,
            vit(pixel_values=torch.ones(1, 3, 16, 16)).pooler_output,
            "visual.-prefixed ViT",
        )


def test_bad_checkpoints_fail_with_named_keys(tmp_path):
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=8,
        )
    )
    folder = _save(vit, tmp_path)
    config = json.loads((folder / "config.json").read_text())

    # unknown model type
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "swin"}))
    with pytest.raises(ValueError, match="unsupported checkpoint model_type 'swin'"):
        load_transformers_vision_model(folder)

    # config says 3 layers, weights have 2: the missing genvis keys are named
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing keys \[.*blocks\.2\.attn\.to_q\.weight"):
        load_transformers_vision_model(folder)

    # a stray key and a wrong shape
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(str(folder / "model.safetensors"))
    state["encoder.layer.0.attention.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.extra\.weight"):
        load_transformers_vision_model(folder)
    del state["encoder.layer.0.attention.extra.weight"]
    state["layernorm.weight"] = torch.zeros(31)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"norm\.weight: checkpoint \(31,\) vs model \(32,\)"):
        load_transformers_vision_model(folder)

    # a checkpoint of another family
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl_vision", "depth": 2}))
    with pytest.raises(ValueError, match="does not look like a qwen2_vl vision model"):
        load_transformers_vision_model(folder)
