"""LoRA folders written by genvis.layers.lora.save_lora load through each library's own loader and change the output.

Nothing is trained: a tiny LaVin-DiT and a tiny MVDiT get a LoRA adapter whose weights are perturbed, the base model
and the adapter are saved, and one *fresh* Python process loads the adapter with

- peft: ``PeftModel.from_pretrained(base, folder)``;
- diffusers: ``model.load_lora_adapter(folder, use_safetensors=True)`` (default prefix ``transformer``) on a class
  with diffusers' ``PeftAdapterMixin`` (the genvis class itself once it has the mixin, else a subclass adding it);
- genvis: ``genvis.layers.lora.load_lora``;
- the LaVin-DiT pipeline: ``pipe.load_lora_weights(folder)``;
- an MLLM's language model (``<model>/language_model``, transformers): ``PeftModel.from_pretrained`` and transformers'
  ``load_adapter`` on ``<model>/lora`` (written by ``save_vision_language_lora`` next to genvis' own file).

Each output must equal the merged (or adapted) model's and differ from the base model's. A folder whose keys do not
fit must raise an error naming the folder and the keys; genvis' old layout (no ``base_model.model.`` prefix) still
loads, with one log line. See docs/pipelines.md, "LoRA adapters".
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from genvis.layers.lora import add_lora, load_lora, merge_lora, save_lora

SCRIPT = r"""
import importlib
import json
import sys

import torch

torch.set_num_threads(1)


def _image(seed, size=16):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run_model(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(*inputs).sample


def run_pipe(pipe):
    pipe.set_progress_bar_config(disable=True)
    out = pipe([(_image(0), _image(1))], _image(2), num_inference_steps=2, guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.frames.float()


def main(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import PeftModel

    from genvis.layers.lora import load_lora

    inputs = torch.load(spec["inputs"])
    outputs, report = {}, {}
    for family, item in spec["families"].items():
        module, name = item["class"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        args = inputs[family]
        model = PeftModel.from_pretrained(cls.from_pretrained(item["base"]), item["lora"])
        outputs[f"{family}/peft"] = run_model(model, args)
        report[f"{family}/has_load_lora_adapter"] = hasattr(cls, "load_lora_adapter")
        adaptable = cls if hasattr(cls, "load_lora_adapter") else type(name, (cls, PeftAdapterMixin), {})
        model = adaptable.from_pretrained(item["base"])
        model.load_lora_adapter(item["lora"], use_safetensors=True)
        outputs[f"{family}/diffusers"] = run_model(model, args)
        model = cls.from_pretrained(item["base"])
        load_lora(model, item["lora"])
        outputs[f"{family}/genvis"] = run_model(model, args)

    from transformers import AutoModelForCausalLM

    mllm = spec["mllm"]
    with torch.no_grad():
        lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mllm["language_model"]), mllm["lora"])
        outputs["mllm/peft"] = lm.eval()(inputs["mllm"]).logits
        lm = AutoModelForCausalLM.from_pretrained(mllm["language_model"])
        lm.load_adapter(mllm["lora"])
        outputs["mllm/transformers"] = lm.eval()(inputs["mllm"]).logits

    from genvis.pipelines import LaVinDiTPipeline

    pipe = LaVinDiTPipeline.from_pretrained(spec["pipeline"])
    pipe.load_lora_weights(spec["families"]["lavin"]["lora"])
    report["adapters"] = pipe.get_list_adapters()
    outputs["lavin/pipeline"] = run_pipe(pipe)
    pipe.unload_lora_weights()
    outputs["lavin/pipeline_unloaded"] = run_pipe(pipe)
    try:
        pipe.load_lora_weights(spec["families"]["mvdit"]["lora"])
        report["pipeline_mismatch"] = None
    except ValueError as err:
        report["pipeline_mismatch"] = str(err)
    torch.save(outputs, out_path)
    with open(out_path + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
"""


def _open_zero_branches(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # zero-initialised gates would hide the adapted layers
        for param in model.parameters():
            if not param.any():
                param.normal_(0, 0.05)
    return model.eval()


def _lavin():
    from genvis.models import LaVinDiTTransformer3DModel

    torch.manual_seed(0)
    model = LaVinDiTTransformer3DModel(
        in_channels=12, num_layers=1, num_attention_heads=2, num_kv_heads=1, attention_head_dim=12
    )
    inputs = (torch.randn(2, 12, 1, 4, 4), torch.randn(2, 12, 3, 4, 4), torch.tensor([0.2, 0.8]))
    return _open_zero_branches(model), inputs


def _mvdit():
    from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel

    torch.manual_seed(0)
    model = MVDiTTransformer3DModel(**{**MVDIT_PRESETS["tiny"], "num_layers": 1})
    inputs = (torch.randn(2, 4, 2, 4, 4), torch.randn(2, 5, 384), torch.tensor([10, 500]))
    return _open_zero_branches(model), inputs


def _adapt(model: torch.nn.Module, seed: int):
    config = add_lora(model, rank=2, alpha=3)  # alpha != rank: a loader that drops the config gets another scale
    _perturb(model, seed)
    return config


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def _run(model, inputs):
    with torch.no_grad():
        return model.eval()(*inputs).sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Base models, adapters and references for both families, plus a LaVin pipeline around the same base."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from genvis.models import PixelUnshuffleAutoencoder
    from genvis.pipelines import LaVinDiTPipeline

    root = tmp_path_factory.mktemp("lora_exports")
    script = root / "reload.py"
    script.write_text(SCRIPT)
    run_pipe = runpy.run_path(str(script), run_name="reload")["run_pipe"]
    families, references, inputs = {}, {}, {}
    for family, build in (("lavin", _lavin), ("mvdit", _mvdit)):
        model, args = build()
        model.save_pretrained(root / family / "base")
        base = _run(model, args)
        config = _adapt(model, seed=1)
        save_lora(model, root / family / "lora", config)
        merged = merge_lora(model)
        references[family] = {"base": base, "merged": _run(merged, args), "adapted": _run(model, args)}
        inputs[family] = args
        families[family] = {
            "class": f"{type(merged).__module__}.{type(merged).__name__}",
            "base": str(root / family / "base"),
            "lora": str(root / family / "lora"),
        }
        if family == "lavin":
            transformer = type(merged).from_pretrained(root / family / "base")
            pipe = LaVinDiTPipeline(transformer, PixelUnshuffleAutoencoder(), FlowMatchEulerDiscreteScheduler())
            pipe.save_pretrained(root / "pipeline")
            references["pipeline_base"] = run_pipe(pipe)
            pipe.transformer = merged
            references["pipeline_merged"] = run_pipe(pipe)
    from genvis.layers.lora import save_vision_language_lora
    from genvis.models.vision_tower import VisionLanguageModel

    torch.manual_seed(0)
    mllm = VisionLanguageModel.from_configs().eval()
    inputs["mllm"] = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        references["mllm_base"] = mllm.language_model(inputs["mllm"]).logits
    mllm.enable_lora(r=2, lora_alpha=3)
    _perturb(mllm, seed=2)
    mllm.save_pretrained(root / "mllm")
    save_vision_language_lora(mllm, root / "mllm")
    with torch.no_grad():
        references["mllm"] = mllm.language_model(inputs["mllm"]).logits
    torch.save(inputs, root / "inputs.pt")
    spec = {
        "families": families,
        "pipeline": str(root / "pipeline"),
        "inputs": str(root / "inputs.pt"),
        "mllm": {"language_model": str(root / "mllm" / "language_model"), "lora": str(root / "mllm" / "lora")},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    return root, script, references, inputs


def test_folder_has_peft_and_diffusers_layouts(saved):
    root, _, _, _ = saved
    folder = root / "lavin" / "lora"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 3)
    peft_keys = set(load_file(folder / "adapter_model.safetensors"))
    assert peft_keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in peft_keys)
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as handle:
        diffusers_keys, metadata = set(handle.keys()), handle.metadata()
    assert {k.removeprefix("transformer.") for k in diffusers_keys} == {
        k[len("base_model.model.") :] for k in peft_keys
    }
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 3


@pytest.mark.e2e
def test_every_loader_applies_the_adapter_in_a_fresh_process(saved):
    root, script, references, _ = saved
    out = root / "out.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(root / "spec.json"), str(out)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"reload failed:\n{proc.stderr[-4000:]}"
    outputs, report = torch.load(out), json.loads(Path(f"{out}.json").read_text())
    for family in ("lavin", "mvdit"):
        assert not torch.allclose(references[family]["merged"], references[family]["base"], atol=1e-3)
        for loader in ("peft", "diffusers", "genvis"):
            got = outputs[f"{family}/{loader}"]
            torch.testing.assert_close(got, references[family]["merged"], atol=1e-5, rtol=1e-4)
            assert not torch.allclose(got, references[family]["base"], atol=1e-3), f"{family}/{loader} loaded nothing"
    assert not torch.allclose(references["mllm"], references["mllm_base"], atol=1e-3)
    for loader in ("peft", "transformers"):  # the MLLM's language model + its adapter in peft's layout
        torch.testing.assert_close(outputs[f"mllm/{loader}"], references["mllm"], atol=1e-5, rtol=1e-4)
    assert report["adapters"] == ["default_0"]
    torch.testing.assert_close(outputs["lavin/pipeline"], references["pipeline_merged"], atol=1e-4, rtol=0)
    assert not torch.allclose(outputs["lavin/pipeline"], references["pipeline_base"], atol=1e-3)
    torch.testing.assert_close(outputs["lavin/pipeline_unloaded"], references["pipeline_base"], atol=1e-5, rtol=0)
    mismatch = report["pipeline_mismatch"]
    assert (
        mismatch and str(root / "mvdit" / "lora") in mismatch and "does not fit LaVinDiTTransformer3DModel" in mismatch
    )


def test_a_folder_that_does_not_fit_is_an_error_naming_folder_and_keys(saved):
    from genvis.pipelines import LaVinDiTPipeline

    root, _, references, inputs = saved
    model, _ = _mvdit()
    with pytest.raises(ValueError) as err:
        load_lora(model, root / "lavin" / "lora")
    message = str(err.value)
    assert str(root / "lavin" / "lora") in message and "does not fit MVDiTTransformer3DModel" in message
    assert "missing keys e.g. [" in message and ".lora_A.weight" in message
    assert not any("lora_" in name for name, _ in model.named_parameters())  # nothing half-loaded
    torch.testing.assert_close(_run(model, inputs["mvdit"]), references["mvdit"]["base"])

    pipe = LaVinDiTPipeline.from_pretrained(root / "pipeline")
    args = inputs["lavin"]
    pipe.load_lora_weights(root / "lavin" / "lora")
    pipe.load_lora_weights(root / "lavin" / "lora", adapter_name="again")  # the last one loaded is active
    assert pipe.get_list_adapters() == ["default_0", "again"]
    torch.testing.assert_close(_run(pipe.transformer, args), references["lavin"]["adapted"])
    pipe.set_adapters(["default_0", "again"])  # two equal adapters active: B A counted twice, as with 2 B
    doubled, _ = _lavin()
    load_lora(doubled, root / "lavin" / "lora")
    with torch.no_grad():
        for name, param in doubled.named_parameters():
            if "lora_B" in name:
                param.mul_(2)
    torch.testing.assert_close(_run(pipe.transformer, args), _run(doubled, args), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\['nope'\] not among the loaded adapters \['default_0', 'again'\]"):
        pipe.set_adapters("nope")
    with pytest.raises(ValueError, match=r"holds LoRA adapters \['default_0', 'again'\].*fuse_lora"):
        pipe.save_pretrained(root / "unsaved")
    pipe.unload_lora_weights()
    torch.testing.assert_close(_run(pipe.transformer, args), references["lavin"]["base"])
    pipe.load_lora_weights(root / "lavin" / "lora")
    pipe.fuse_lora()  # merged into plain weights: the export is an ordinary pipeline folder
    pipe.save_pretrained(root / "fused")
    fused = LaVinDiTPipeline.from_pretrained(root / "fused").transformer
    torch.testing.assert_close(_run(fused, args), references["lavin"]["merged"])
    pipe = LaVinDiTPipeline.from_pretrained(root / "pipeline")
    with pytest.raises(ValueError, match=r"no key starts with 'unet\.'"):
        pipe.load_lora_weights(root / "lavin" / "lora", prefix="unet")
    with pytest.raises(ValueError, match=r"load_lora_weights: .*nope does not exist"):
        pipe.load_lora_weights(root / "nope")
    with pytest.raises(ValueError, match=r"expected adapter_config.json and adapter_model.safetensors"):
        load_lora(model, root / "pipeline")
    assert pipe.get_list_adapters() == []

    from genvis.models import LaVinDiTTransformer3DModel
    from genvis.training.explora import explora, save_explora

    model = LaVinDiTTransformer3DModel(
        in_channels=12, num_layers=2, num_attention_heads=2, num_kv_heads=1, attention_head_dim=12
    )
    save_explora(model, root / "explora", explora(model, unfreeze_blocks=[-1], lora_rank=2))
    with pytest.raises(ValueError, match=r"holds an ExPLoRA run.*load_explora"):  # its adapters alone: half a model
        pipe.load_lora_weights(root / "explora")


def test_old_genvis_layout_is_converted_on_load(saved, tmp_path, caplog):
    """genvis used to write adapter_model.safetensors keyed ``<layer>.lora_A.weight`` (peft loaded nothing from it)."""
    root, _, references, inputs = saved
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_bytes((root / "lavin" / "lora" / "adapter_config.json").read_bytes())
    state = load_file(root / "lavin" / "lora" / "adapter_model.safetensors")
    save_file({k[len("base_model.model.") :]: v for k, v in state.items()}, old / "adapter_model.safetensors")
    model, _ = _lavin()
    with caplog.at_level(logging.INFO, logger="genvis.layers.lora"):
        load_lora(model, old)
    notes = [r.getMessage() for r in caplog.records if r.name == "genvis.layers.lora"]
    assert len(notes) == 1 and "old layout" in notes[0] and str(old) in notes[0]
    torch.testing.assert_close(_run(model, inputs["lavin"]), references["lavin"]["adapted"])


def test_documented_lora_snippets_run(saved):
    """docs/pipelines.md "LoRA adapters": both Python blocks run as written on the saved folders (paths replaced)."""
    root, _, references, inputs = saved
    docs = (Path(__file__).resolve().parents[2] / "docs" / "pipelines.md").read_text()
    section = docs.split("## LoRA adapters", 1)[1]
    blocks = [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]
    assert len(blocks) == 2, "the documented snippets changed: update this test"
    paths = {
        "runs/lavin_dit/pipeline/transformer": root / "lavin" / "base",
        "runs/lavin_dit/pipeline": root / "pipeline",
        "runs/lavin_dit_lora/lora": root / "lavin" / "lora",
        "runs/mllm-tiny/model/language_model": root / "mllm" / "language_model",
        "runs/mllm-tiny/model/lora": root / "mllm" / "lora",
    }
    namespaces = []
    for block in blocks:
        for path, real in paths.items():  # quoted, so one path never matches inside another
            block = block.replace(f'"{path}"', repr(str(real)))
        assert "runs/" not in block, block
        namespace: dict = {}
        exec(compile(block, "docs/pipelines.md", "exec"), namespace)
        namespaces.append(namespace)
    lavin, mllm = namespaces
    with torch.no_grad():
        torch.testing.assert_close(lavin["model"].eval()(*inputs["lavin"]).sample, references["lavin"]["merged"])
        torch.testing.assert_close(mllm["lm"].eval()(inputs["mllm"]).logits, references["mllm"], atol=1e-5, rtol=1e-4)
    assert lavin["pipe"].get_list_adapters() == []  # the snippet unloads at the end
