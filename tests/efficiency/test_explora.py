"""genvis.training.explora: ExPLoRA (unfreeze named blocks + LoRA elsewhere + norms) on the ViT and the DiTs."""

import pytest
import torch
import torch.nn.functional as F

from genvis.encoders import VisionTransformerModel
from genvis.layers.lora import merge_lora
from genvis.models.lavin_dit import LAVIN_DIT_PRESETS, LaVinDiTTransformer3DModel
from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel
from genvis.training.explora import explora, explora_parameters, load_explora, save_explora


def _encoder(seed=0):
    torch.manual_seed(seed)
    return VisionTransformerModel(
        patch_size=8, num_layers=3, num_attention_heads=2, attention_head_dim=16, mlp_hidden_dim=64
    ).eval()


def _images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_trainable_set_exactly_as_configured():
    model = _encoder()
    config = explora(model, unfreeze_blocks=[-1], lora_rank=4, target_modules=("to_q", "to_v"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("blocks.2.")}
    expected |= {n for n, _ in model.named_parameters() if "lora_" in n}
    expected |= {n for n, _ in model.named_parameters() if ".norm" in n or n.startswith("norm.")}
    assert trainable == expected
    lora_layers = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert lora_layers == {f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("to_q", "to_v")}
    assert config.unfrozen_modules == ["blocks.2"]
    assert not any("lora_" in n for n in trainable if n.startswith("blocks.2."))
    assert len(explora_parameters(model)) == len(trainable)


def test_only_trainable_parameters_change_and_adapters_round_trip(tmp_path):
    model = _encoder()
    images = _images()
    with torch.no_grad():
        base_output = model(images).pooler_output
    config = explora(model, unfreeze_blocks=[-1], lora_rank=4, extra_trainable=["cls_token"])
    with torch.no_grad():
        torch.testing.assert_close(model(images).pooler_output, base_output)  # LoRA B = 0 at init
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(explora_parameters(model), lr=1e-2)
    target = torch.randn(4, model.dim, generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        loss = F.mse_loss(model(images).pooler_output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == param.requires_grad, name  # frozen weights (also LoRA base layers) never move
    assert any("lora_B" in n and not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        trained_output = model(images).pooler_output
    assert not torch.allclose(trained_output, base_output)

    save_explora(model, tmp_path / "adapter", config)
    fresh = _encoder()
    loaded = load_explora(fresh, tmp_path / "adapter")
    assert loaded == config
    with torch.no_grad():
        torch.testing.assert_close(fresh(images).pooler_output, trained_output)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }

    merged = merge_lora(model)  # plain weights, original state-dict layout
    merged.save_pretrained(tmp_path / "merged")
    reloaded = VisionTransformerModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images).pooler_output, trained_output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("model_cls", "preset", "blocks"),
    [
        (LaVinDiTTransformer3DModel, LAVIN_DIT_PRESETS, "transformer_blocks"),
        (MVDiTTransformer3DModel, MVDIT_PRESETS, "blocks"),
    ],
)
def test_dits(model_cls, preset, blocks):
    torch.manual_seed(0)
    model = model_cls(**preset["tiny"])
    config = explora(model, unfreeze_blocks=[0], lora_rank=2, target_modules=("to_q", "to_k", "to_v"))
    assert config.unfrozen_modules == [f"{blocks}.0"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith(f"{blocks}.0.") and "lora_" not in n for n in trainable)
    assert any(n.startswith(f"{blocks}.1.") and "lora_A" in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith(f"{blocks}.1.") for n in frozen)


def test_bad_input():
    with pytest.raises(ValueError, match="outside"):
        explora(_encoder(), unfreeze_blocks=[5])
    with pytest.raises(ValueError, match="no module"):
        explora(_encoder(), unfreeze_blocks=["blocks.9"])
    with pytest.raises(ValueError, match="match no"):
        explora(_encoder(), target_modules=("qkv",))
    with pytest.raises(ValueError, match="extra_trainable"):
        explora(_encoder(), extra_trainable=["nothing_here"])
