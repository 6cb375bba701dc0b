"""REPA (genvis.training.repa): the hook reads the chosen block, gradients reach projector + DiT but not the encoder."""

import json

import pytest
import torch

from genvis.encoders import VISION_TRANSFORMER_PRESETS, VisionTransformerModel
from genvis.models import LaVinDiTTransformer3DModel
from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel
from genvis.training.repa import (
    BlockOutputCapture,
    RepresentationAlignment,
    fit_toy_encoder,
    load_alignment_encoder,
)


def _encoder() -> VisionTransformerModel:
    torch.manual_seed(0)
    return VisionTransformerModel(**{**VISION_TRANSFORMER_PRESETS["tiny"], "patch_size": 4})


def _lavin() -> LaVinDiTTransformer3DModel:
    torch.manual_seed(0)
    model = LaVinDiTTransformer3DModel.from_preset("tiny", num_layers=3, in_channels=12)
    with torch.no_grad():  # open the zero-initialised adaLN gates so every block passes gradients
        for block in model.transformer_blocks:
            for p in block.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return model


def _lavin_batch():
    targets = [torch.randn(12, 1, 16, 16), torch.randn(12, 1, 8, 16)]  # 8x8 and 4x8 token grids (patch 2)
    contexts = [torch.randn(12, 3, 16, 16), torch.randn(12, 3, 8, 16)]
    images = [torch.rand(3, 1, 32, 32) * 2 - 1, torch.rand(3, 1, 16, 32) * 2 - 1]
    return targets, contexts, images


def test_hook_captures_the_chosen_block():
    model = _lavin()
    targets, contexts, _ = _lavin_batch()
    t = torch.tensor([0.3, 0.7])
    captured = {}
    for layer in range(3):
        with BlockOutputCapture(model.transformer_blocks[layer], lambda out: out[1]) as capture:
            model(targets, contexts, t)
        captured[layer] = capture.value.detach().clone()
        assert capture.calls == 1 and capture.value.shape == (1, 64 + 32, 96)  # packed target stream
    assert not torch.allclose(captured[0], captured[1])
    # changing a later block leaves the captured output of block 1 unchanged; changing block 1 does not
    repa = RepresentationAlignment(_encoder(), model, layer=1)
    with torch.no_grad():
        model.transformer_blocks[2].target_ff.w2.weight.add_(1.0)
    with repa.capture() as capture:
        model(targets, contexts, t)
    torch.testing.assert_close(capture.value, captured[1])
    with torch.no_grad():
        model.transformer_blocks[1].target_ff.w2.weight.add_(1.0)
    with repa.capture() as capture:
        model(targets, contexts, t)
    assert not torch.allclose(capture.value, captured[1])
    assert len(model.transformer_blocks[1]._forward_hooks) == 0  # removed on exit


def test_gradients_reach_projector_and_blocks_up_to_the_layer_not_the_encoder():
    model, encoder = _lavin(), _encoder()
    repa = RepresentationAlignment(encoder, model, layer=1, weight=0.5)
    targets, contexts, images = _lavin_batch()
    with repa.capture():
        model(targets, contexts, torch.tensor([0.3, 0.7]))
    result = repa.loss(images, targets)
    assert result.loss.shape == () and -0.5 <= result.loss.item() <= 0.5
    torch.testing.assert_close(result.loss, -0.5 * result.similarity)
    result.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert model.transformer_blocks[0].target_ff.w1.weight.grad.abs().sum() > 0
    assert model.transformer_blocks[1].target_ff.w1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.transformer_blocks[2].parameters())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_alignment_loss_trains_the_projector():
    model, encoder = _lavin(), _encoder()
    repa = RepresentationAlignment(encoder, model, layer=0, weight=1.0)
    targets, contexts, images = _lavin_batch()
    optimizer = torch.optim.Adam([*repa.projector.parameters(), *model.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        with repa.capture():
            model(targets, contexts, torch.tensor([0.3, 0.7]))
        loss = repa.loss(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


def test_encoder_features_are_resized_to_the_dit_token_grid():
    repa = RepresentationAlignment(_encoder(), _lavin(), layer=0)
    clip = torch.rand(3, 5, 24, 40) * 2 - 1  # 5 frames -> encoder grid (5, 6, 10) -> DiT grid (2, 3, 5)
    (features,) = repa.target_features([clip], [(2, 3, 5)])
    assert features.shape == (2 * 3 * 5, 32)
    # same grid: no interpolation, the encoder's own patch tokens in raster order
    (same,) = repa.target_features([clip[:, :1]], [(1, 6, 10)])
    frame = ((clip[:, 0] + 1) / 2 - 0.5) / 0.5
    torch.testing.assert_close(same, repa.encoder.forward_features(frame[None]).patch_tokens)


def test_mvdit_video_tokens():
    torch.manual_seed(0)
    model = MVDiTTransformer3DModel(**MVDIT_PRESETS["tiny"])
    repa = RepresentationAlignment(_encoder(), model, layer=-1)
    latents = torch.randn(2, 4, 3, 4, 4)  # (B, C, T, H, W): 3 latent frames of 2x2 tokens
    with repa.capture() as capture:
        model(latents, torch.randn(2, 5, 384), torch.tensor([10, 20]))
    assert capture.value.shape == (2, 3 * 2 * 2, 32)
    result = repa.loss(torch.rand(2, 3, 9, 32, 32) * 2 - 1, latents)  # 9 pixel frames -> 3 latent frames
    result.loss.backward()
    assert model.blocks[-1].ff.fc2.weight.grad is not None


def test_bad_input_is_named():
    model = _lavin()
    with pytest.raises(ValueError, match=r"repa\.layer"):
        RepresentationAlignment(_encoder(), model, layer=3)
    with pytest.raises(ValueError, match="LaVinDiTTransformer3DModel or MVDiTTransformer3DModel"):
        RepresentationAlignment(_encoder(), torch.nn.Linear(2, 2), layer=0)
    repa = RepresentationAlignment(_encoder(), model, layer=0)
    targets, _, images = _lavin_batch()
    with pytest.raises(ValueError, match="capture"):
        repa.loss(images, targets)
    with pytest.raises(ValueError, match="token grids"):
        repa.loss(images, targets, hidden_states=torch.zeros(1, 10, 96))


def test_load_genvis_and_transformers_encoders(tmp_path):
    from transformers import ViTConfig, ViTModel

    toy = fit_toy_encoder(torch.rand(16, 3, 16, 16) * 2 - 1, steps=3, batch_size=4)
    toy.save_pretrained(tmp_path / "toy")
    loaded, mean, std = load_alignment_encoder(str(tmp_path / "toy"))
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded.forward_features(x).patch_tokens, toy.forward_features(x).patch_tokens)
    assert mean == (0.5, 0.5, 0.5) and not any(p.requires_grad for p in loaded.parameters())

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4)  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    stats = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(stats))
    encoder, mean, std = load_alignment_encoder(str(tmp_path / "vit"))
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    repa = RepresentationAlignment(encoder, _lavin(), layer=0, image_mean=mean, image_std=std)
    assert repa.encoder_dim == 32
    with pytest.raises(ValueError, match=r"config\.json"):
        load_alignment_encoder(str(tmp_path / "nothing"))
