"""MVDiTTransformer3DModel: round trip, gradients, temporal mixing, text masking and null caption, presets."""

import inspect

import pytest
import torch

from genvis.models.mvdit import MVDIT_PRESETS, MVDiTBlock, MVDiTTransformer3DModel

TEXT_DIM = 24


def tiny_model(**overrides) -> MVDiTTransformer3DModel:
    config = {**MVDIT_PRESETS["tiny"], "text_embed_dim": TEXT_DIM, "max_text_length": 8, **overrides}
    return MVDiTTransformer3DModel(**config)


def perturb_zero_init(model: torch.nn.Module, skip: tuple[str, ...] = (), scale: float = 0.05) -> None:
    """Give the zero-initialised weights (output head, temporal/cross output projections) random values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any() and not any(s in name for s in skip):
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def dummy_inputs(batch: int = 2, frames: int = 3, size: int = 8, length: int = 6):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, frames, size, size, generator=generator)
    text = torch.randn(batch, length, TEXT_DIM, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length // 2 :] = False
    timestep = torch.tensor([3, 700][:batch] + [100] * max(0, batch - 2))
    return latents, text, timestep, mask


def test_output_shape_learn_sigma_and_not():
    latents, text, timestep, mask = dummy_inputs()
    assert tiny_model()(latents, text, timestep, mask).sample.shape == (2, 8, 3, 8, 8)
    out = tiny_model(learn_sigma=False, patch_size=[1, 2, 2])(latents, text, timestep, mask).sample
    assert out.shape == (2, 4, 3, 8, 8)
    # temporal patching: 4 frames cut into 2 temporal patches still come back as 4 frames
    latents4 = torch.randn(2, 4, 4, 8, 8)
    assert tiny_model(patch_size=[2, 2, 2])(latents4, text, timestep, mask).sample.shape == (2, 8, 4, 8, 8)


def test_zero_init_output_head():
    latents, text, timestep, mask = dummy_inputs()
    assert torch.equal(tiny_model()(latents, text, timestep, mask).sample, torch.zeros(2, 8, 3, 8, 8))


def test_save_load_round_trip_exact(tmp_path):
    model = tiny_model()
    perturb_zero_init(model)
    model.save_pretrained(tmp_path)
    loaded = MVDiTTransformer3DModel.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert "null_text_embedding" in loaded.state_dict()  # the fixed null caption is saved, not re-drawn
    inputs = dummy_inputs()
    with torch.no_grad():
        assert torch.equal(model(*inputs).sample, loaded(*inputs).sample)
    assert MVDiTTransformer3DModel.from_config(model.config).config == model.config


def test_every_parameter_gets_a_finite_nonzero_gradient():
    model = tiny_model()
    perturb_zero_init(model)
    latents, text, timestep, mask = dummy_inputs()
    model(latents, text, timestep, mask).sample.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not missing, f"no/non-finite gradient: {missing}"
    assert not zero, f"all-zero gradient: {zero}"
    assert model.blocks[-1].ff_text is None and model.blocks[0].ff_text is not None


def _frame_jacobian_norm(model, source_frame: int, target_frame: int) -> float:
    latents, text, timestep, mask = dummy_inputs(batch=1, frames=3)
    latents.requires_grad_(True)
    out = model(latents, text, timestep, mask).sample
    out[:, :, target_frame].square().sum().backward()
    return float(latents.grad[:, :, source_frame].abs().sum())


def test_temporal_attention_mixes_frames():
    model = tiny_model()
    # everything but the temporal output projections non-zero: frames must still be independent
    perturb_zero_init(model, skip=("temporal_attn.to_out",))
    assert _frame_jacobian_norm(model, source_frame=0, target_frame=2) == 0.0
    assert _frame_jacobian_norm(model, source_frame=2, target_frame=2) > 0.0
    # once the temporal branch is open, frame 0 influences frame 2 (and vice versa: no causal mask)
    perturb_zero_init(model)
    assert _frame_jacobian_norm(model, source_frame=0, target_frame=2) > 1e-6
    assert _frame_jacobian_norm(model, source_frame=2, target_frame=0) > 1e-6


def test_padded_text_tokens_are_ignored():
    model = tiny_model()
    perturb_zero_init(model)
    latents, text, timestep, mask = dummy_inputs()
    changed = text.clone()
    changed[0, ~mask[0]] = 100.0
    with torch.no_grad():
        reference = model(latents, text, timestep, mask).sample
        out = model(latents, changed, timestep, mask).sample
        unmasked = model(latents, changed, timestep, None).sample
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked[0], reference[0], atol=1e-3)


def test_drop_text_uses_the_null_caption_and_is_per_row():
    model = tiny_model()
    perturb_zero_init(model)
    latents, text, timestep, mask = dummy_inputs()
    drop = torch.tensor([True, False])
    null = model.null_text_embedding[: text.shape[1]].expand_as(text)
    with torch.no_grad():
        dropped = model(latents, text, timestep, mask, drop_text=drop).sample
        explicit_null = model(latents, null, timestep, torch.ones_like(mask)).sample
        conditional = model(latents, text, timestep, mask).sample
    torch.testing.assert_close(dropped[0], explicit_null[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(dropped[1], conditional[1], rtol=0, atol=1e-6)
    assert not torch.allclose(dropped[0], conditional[0], atol=1e-4)
    # the null caption is a fixed buffer: not trained, deterministic across constructions
    assert "null_text_embedding" not in dict(model.named_parameters())
    assert torch.equal(model.null_text_embedding, tiny_model().null_text_embedding)


def test_batch_rows_are_independent():
    model = tiny_model()
    perturb_zero_init(model)
    latents, text, timestep, mask = dummy_inputs()
    with torch.no_grad():
        both = model(latents, text, timestep, mask).sample
        first = model(latents[:1], text[:1], timestep[:1], mask[:1]).sample
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_matches():
    model = tiny_model()
    perturb_zero_init(model)
    inputs = dummy_inputs()
    model(*inputs).sample.square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    model(*inputs).sample.square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_forward_is_finite():
    model = tiny_model().to(torch.bfloat16)
    perturb_zero_init(model)
    latents, text, timestep, mask = dummy_inputs()
    out = model(latents.bfloat16(), text.bfloat16(), timestep, mask).sample
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patch_size": [2, 2]}, "patch_size"),
        ({"out_channels": 4}, "out_channels: expected 8"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_attention_heads": 1, "attention_head_dim": 6}, "divisible by 4"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


def test_input_errors():
    model = tiny_model()
    latents, text, timestep, mask = dummy_inputs()
    with pytest.raises(ValueError, match="hidden_states"):
        model(latents[:, :3], text, timestep, mask)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(latents[..., :7], text, timestep, mask)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(latents, text[..., :5], timestep, mask)
    with pytest.raises(ValueError, match="max_text_length=8"):
        model(latents, torch.randn(2, 9, TEXT_DIM), timestep, None)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(latents, text, timestep, mask[:, :3])
    with pytest.raises(ValueError, match="timestep"):
        model(latents, text, torch.tensor([1, 2, 3]), mask)


def test_xl_preset_size():
    with torch.device("meta"):
        model = MVDiTTransformer3DModel(**MVDIT_PRESETS["XL"])
    params = sum(p.numel() for p in model.parameters())
    # spec §3.1: about 1.07B with the last block's (discarded) text FFN, 10.6M of which is dropped here
    assert 1.05e9 < params < 1.08e9
    assert model.inner_dim == 1152 and len(model.blocks) == 28 and model.out_channels == 8


def test_every_init_argument_is_documented():
    for cls in (MVDiTTransformer3DModel, MVDiTBlock):
        doc = inspect.getdoc(cls)
        for name in inspect.signature(cls.__init__).parameters:
            if name != "self":
                assert f"{name}:" in doc, f"{cls.__name__} does not document {name}"


def test_frame_embedding_starts_as_the_paper_model_and_makes_frames_distinguishable(tmp_path):
    torch.manual_seed(0)
    paper = tiny_model()
    torch.manual_seed(0)
    ours = tiny_model(frame_embedding=True)
    extra = {"frame_embedder.weight", "frame_embedder.bias"}
    assert set(ours.state_dict()) == set(paper.state_dict()) | extra
    for key, value in paper.state_dict().items():  # same seed, same weights: the option draws no random numbers
        assert torch.equal(value, ours.state_dict()[key]), key
    assert not ours.frame_embedder.weight.any() and not ours.frame_embedder.bias.any()
    perturb_zero_init(paper, skip=("temporal_attn.to_out",))
    perturb_zero_init(ours, skip=("temporal_attn.to_out", "frame_embedder"))
    latents, text, timestep, mask = dummy_inputs()
    latents = latents[:, :, :1].expand(-1, -1, 3, -1, -1).contiguous()  # three identical frames
    with torch.no_grad():
        out_paper, out_ours = paper(latents, text, timestep, mask).sample, ours(latents, text, timestep, mask).sample
    assert torch.equal(out_paper, out_ours)  # zero-init: exactly the paper model
    # without temporal mixing the paper model cannot tell identical frames apart; the frame embedding can
    assert torch.equal(out_paper[:, :, 0], out_paper[:, :, 2])
    ours(latents, text, timestep, mask).sample.square().mean().backward()
    assert ours.frame_embedder.weight.grad.abs().sum() > 0
    perturb_zero_init(ours, skip=("temporal_attn.to_out",))
    with torch.no_grad():
        out_ours = ours(latents, text, timestep, mask).sample
    assert (out_ours[:, :, 0] - out_ours[:, :, 2]).abs().max() > 1e-4
    ours.save_pretrained(tmp_path)
    loaded = MVDiTTransformer3DModel.from_pretrained(tmp_path)
    assert loaded.config.frame_embedding and torch.equal(loaded.frame_embedder.weight, ours.frame_embedder.weight)
