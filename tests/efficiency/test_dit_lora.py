"""LoRA on both DiTs (genvis.layers.lora) and the train scripts' optim / repa / lora options."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from genvis.layers.lora import add_lora, load_lora, lora_parameters, merge_lora, save_lora
from genvis.models import LaVinDiTTransformer3DModel
from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel

ROOT = Path(__file__).resolve().parents[2]


def _lavin():
    torch.manual_seed(0)
    model = LaVinDiTTransformer3DModel.from_preset("tiny", in_channels=4)
    with torch.no_grad():  # open the zero-init gates so the adapted layers matter
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    inputs = (torch.randn(2, 4, 1, 8, 8), torch.randn(2, 4, 3, 8, 8), torch.tensor([0.2, 0.8]))
    return model, inputs


def _mvdit():
    torch.manual_seed(0)
    model = MVDiTTransformer3DModel(**MVDIT_PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    inputs = (torch.randn(2, 4, 2, 4, 4), torch.randn(2, 5, 384), torch.tensor([10, 500]))
    return model, inputs


@pytest.mark.parametrize("build", [_lavin, _mvdit], ids=["lavin_dit", "mvdit"])
def test_lora_adapters_on_the_dits(build, tmp_path):
    model, inputs = build()
    model.eval()
    base_keys = set(model.state_dict())
    with torch.no_grad():
        base = model(*inputs).sample
    config = add_lora(model, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs).sample, base)  # B = 0 at init
        for p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
        adapted = model(*inputs).sample
    assert not torch.allclose(adapted, base)

    save_lora(model, tmp_path / "lora", config)
    fresh, _ = build()
    fresh.eval()
    load_lora(fresh, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs).sample, adapted)

    merged = merge_lora(model)
    assert set(merged.state_dict()) == base_keys  # plain model: save_pretrained / from_pretrained work
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(*inputs).sample, adapted, atol=1e-5, rtol=1e-4)


def test_lora_bad_options():
    model, _ = _lavin()
    with pytest.raises(ValueError, match=r"lora\.rank"):
        add_lora(model, rank=0)
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        add_lora(model, target_modules=["no_such_layer"])


# -------------------------------------------------------------------------------------------------- train scripts
def _options(output_dir: Path) -> list[str]:
    settings = [
        f"output_dir={output_dir}",
        "optim.name=sgd_sai",
        "optim.lr=0.0001",
        "repa.enabled=true",
        "repa.layer=0",
        "repa.toy_encoder_steps=2",
        "repa.toy_encoder_size=16",
        "lora.enabled=true",
        "lora.rank=2",
        "logging.log_with=null",
    ]
    return [item for s in settings for item in ("--set", s)]


def test_lavin_train_script_with_sgd_sai_repa_and_lora(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_lavin_dit_efficiency", ROOT / "train" / "lavin_dit.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    fast = ["data.size=16", "data.num_workers=0", "data.tasks=[foreground_segmentation,colorization]",
            "schedule.batch_size=2", "schedule.max_steps=3", "sampling.episodes_per_task=0",
            "logging.every_steps=1", "checkpoint.every_steps=3"]  # fmt: skip
    argv = ["lavin_dit.py", *_options(tmp_path), *[item for s in fast for item in ("--set", s)]]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    logs = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert all("train/repa_similarity" in entry and entry["train/loss"] > 0 for entry in logs)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    exported = LaVinDiTTransformer3DModel.from_pretrained(tmp_path / "pipeline" / "transformer")  # merged, plain
    assert not any("lora_" in k for k in exported.state_dict())


def test_mvdit_train_script_with_sgd_sai_repa_and_lora(tmp_path):
    from data_pipelines.datasets import ensure_builtin_shards

    ensure_builtin_shards(tmp_path / "data", num_videos=4, num_frames=17, size=64, real_videos=False, num_workers=1)
    sys.path.insert(0, str(ROOT / "train"))
    try:
        import mvdit as script
    finally:
        sys.path.pop(0)
    settings = ["text.encoder=tiny-t5", "text.max_length=24", "vae.kind=pixel", "data.size=16", "data.num_frames=4",
                "data.batch_size=2", "data.batches_per_epoch=2", "schedule.max_steps=2", "checkpoint.every_steps=2",
                "logging.sample_every_steps=0", f"data.builtin_root={tmp_path / 'data'}",
                "data.captions=random", "data.held_out_combinations=0"]  # fmt: skip
    summary = script.main(_options(tmp_path / "run") + [item for s in settings for item in ("--set", s)])
    assert summary["step"] == 2 and summary["last_loss"] == summary["last_loss"]  # finite, not NaN
    assert (tmp_path / "run" / "lora" / "adapter_config.json").is_file()
    exported = MVDiTTransformer3DModel.from_pretrained(tmp_path / "run" / "pipeline" / "transformer")
    assert not any("lora_" in k for k in exported.state_dict())
