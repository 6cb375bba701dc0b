"""Pipeline exports reload in a fresh process through every loader a user reaches for, and give the same output.

Each family (LaVin-DiT with the pixel autoencoder / the ST-VAE, MVDiT with the ST-VAE / pixels) is built here from
tiny random-init genvis classes, ``save_pretrained`` to a folder, then reloaded in *one new* Python process per
family, in this order:

- ``diffusers``: ``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` with genvis never
  imported by the caller (model_index.json's ``"_class_name": [<loader module>, <class>]`` names the folder's loader
  module, which imports genvis); the bare call without ``trust_remote_code`` must name the loader module;
- ``diffusers_custom_pipeline``: the same with ``custom_pipeline=<loader module>``;
- ``diffusers_after_import_genvis``: ``trust_remote_code=True`` alone again, genvis now imported;
- ``genvis_class``: the genvis pipeline class ``from_pretrained``;
- ``components``: every component on its own with ``<class>.from_pretrained(folder, subfolder=<name>)`` (the
  ``[library, class]`` entry of model_index.json) and the pipeline assembled from them.

A folder in the layout genvis wrote before (``"_class_name": "<class>"``) is checked to load too. Every reload must
reproduce the original pipeline's output for the same seed. See docs/pipelines.md.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The script every reload runs. It builds the call inputs with torch only (no genvis import), so the "diffusers"
# mode proves that diffusers alone finds genvis; the test process runs its `run` on the original pipeline.
RELOAD_SCRIPT = r'''
import importlib
import json
import os
import sys

import torch

torch.set_num_threads(1)

PROMPTS = ["a red circle moves left to right", "a green square on blue"]


def _image(seed, size):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(pipe, family):
    """The pipeline's output (a float tensor) for one fixed seed."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    if family.startswith("lavin"):
        size = 32 if family.endswith("st_vae") else 16
        out = pipe([(_image(0, size), _image(1, size))], _image(2, size), num_inference_steps=2, guidance_scale=1.5,
                   generator=generator, output_type="pt")
    else:
        out = pipe(prompt=PROMPTS, num_frames=1 if family.endswith("st_vae") else 2, height=16, width=16,
                   num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="pt")
    return out.frames.float()


def load_components(folder):
    """Every component through its own class: ``<class>.from_pretrained(folder, subfolder=<name>)``."""
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        cls = getattr(importlib.import_module(library), class_name)
        components[name] = cls.from_pretrained(folder, subfolder=name)
    return index, components


def _types(pipe):
    return {
        "pipeline": type(pipe).__module__ + "." + type(pipe).__name__,
        "components": {name: f"{type(c).__module__}.{type(c).__name__}" for name, c in pipe.components.items()},
    }


def main(out, layout, family, folder):
    """Every loader on one folder, in this order: diffusers before genvis is imported, then after, then genvis."""
    assert not any(m == "genvis" or m.startswith("genvis.") for m in sys.modules), "genvis imported too early"
    from diffusers import DiffusionPipeline

    lavin = family.startswith("lavin")
    stem, cls = ("pipeline_lavin_dit", "LaVinDiTPipeline") if lavin else ("pipeline_mvdit", "MVDiTPipeline")
    report, outputs, types = {}, {}, {}
    try:  # list layout: diffusers wants trust_remote_code; string layout: diffusers cannot find the class
        DiffusionPipeline.from_pretrained(folder)
        report["plain_error"] = None
    except (AttributeError, ValueError) as err:
        report["plain_error"] = f"{type(err).__name__}: {err}"
    assert not any(m == "genvis" or m.startswith("genvis.") for m in sys.modules), "the bare call ran folder code"
    calls = {"diffusers_custom_pipeline": {"custom_pipeline": stem, "trust_remote_code": True}}
    if layout == "list":  # trust_remote_code alone, first with genvis never imported, then again after
        calls = {"diffusers": {"trust_remote_code": True}, **calls, "diffusers_after_import_genvis": {"trust_remote_code": True}}
    for name, kwargs in calls.items():
        pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
        outputs[name], types[name] = run(pipe, family), _types(pipe)
    import genvis  # noqa: F401  (imported by the loader module by now)

    module = importlib.import_module(f"genvis.pipelines.{stem}")
    pipeline_class = getattr(module, cls)
    pipe = pipeline_class.from_pretrained(folder)
    outputs["genvis_class"], types["genvis_class"] = run(pipe, family), _types(pipe)
    index, components = load_components(folder)
    pipe = pipeline_class(**components)
    outputs["components"], types["components"] = run(pipe, family), _types(pipe)
    report["types"] = types
    torch.save(outputs, out)
    with open(out + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
'''

FAMILIES = ["lavin-pixel", "lavin-st_vae", "mvdit-st_vae", "mvdit-pixel"]


def _open_zero_branches(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # zero-initialised branches would make the output ignore the weights under test
        for param in model.parameters():
            if not param.any():
                param.normal_(0, 0.05)
    return model


def build_pipeline(family: str):
    """A tiny random-init pipeline of ``family``, straight from genvis classes."""
    torch.manual_seed(0)
    if family.startswith("lavin"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
        from genvis.pipelines import LaVinDiTPipeline

        if family == "lavin-st_vae":
            from genvis.vae import build_st_vae

            vae = build_st_vae("tiny").eval()
        else:
            vae = PixelUnshuffleAutoencoder()
        transformer = LaVinDiTTransformer3DModel(
            in_channels=vae.config.latent_channels, num_layers=1, num_attention_heads=2, num_kv_heads=1,
            attention_head_dim=12,
        )  # fmt: skip
        return LaVinDiTPipeline(_open_zero_branches(transformer), vae, FlowMatchEulerDiscreteScheduler())

    from genvis.diffusion.text_to_video import TextToVideoObjective
    from genvis.models import PixelUnshuffleAutoencoder
    from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel
    from genvis.pipelines.pipeline_mvdit import MVDiTPipeline
    from genvis.text import load_text_encoder, text_embed_dim

    if family == "mvdit-st_vae":
        from genvis.vae import build_st_vae

        vae, objective = build_st_vae("tiny").eval(), "ddpm"
    else:
        vae, objective = PixelUnshuffleAutoencoder(), "flow"
    tokenizer, encoder = load_text_encoder("tiny-t5")
    transformer = MVDiTTransformer3DModel(
        **{**MVDIT_PRESETS["tiny"], "num_layers": 1, "in_channels": vae.config.latent_channels,
           "text_embed_dim": text_embed_dim(encoder), "max_text_length": 24, "learn_sigma": objective == "ddpm"}
    )  # fmt: skip
    scheduler = TextToVideoObjective(objective).make_scheduler()
    return MVDiTPipeline(tokenizer, encoder, _open_zero_branches(transformer), vae, scheduler)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``(script, get)``: ``get(family, class_name_as_list)`` -> ``(folder, reference output)``, each written once."""
    script = tmp_path_factory.mktemp("script") / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    run = runpy.run_path(str(script), run_name="reload")["run"]
    cache: dict[tuple[str, bool], tuple[Path, torch.Tensor]] = {}

    def get(family: str, class_name_as_list: bool = True):
        key = (family, class_name_as_list)
        if key not in cache:
            pipe = build_pipeline(family)
            if not class_name_as_list:  # the layout genvis wrote before the switch: "_class_name": "<class>"
                pipe._class_name_as_list = False
            folder = tmp_path_factory.mktemp(family)
            pipe.save_pretrained(folder)
            cache[key] = (folder, run(pipe, family))
        return cache[key]

    return script, get


def _reload(script: Path, layout: str, family: str, folder: Path, tmp_path: Path):
    out = tmp_path / "out.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), layout, family, str(folder)],
        cwd=tmp_path,  # genvis comes from the installed package, not from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{layout}-layout reload of {family} failed:\n{proc.stderr[-4000:]}"
    return torch.load(out), json.loads(Path(f"{out}.json").read_text())


def _check_types(report: dict, family: str, loaders: set[str]) -> None:
    cls = "LaVinDiTPipeline" if family.startswith("lavin") else "MVDiTPipeline"
    vae_class = "AutoencoderKLSTVAE" if family.endswith("st_vae") else "PixelUnshuffleAutoencoder"
    assert set(report["types"]) == loaders
    for loader, types in report["types"].items():
        assert types["pipeline"].endswith(f".{cls}"), f"{loader}: {types['pipeline']}"
        assert types["components"]["vae"].endswith(vae_class), f"{loader}: {types['components']['vae']}"


@pytest.mark.e2e
@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_a_fresh_process(exports, tmp_path, family):
    """One fresh process per family: diffusers with ``trust_remote_code=True`` alone (genvis not imported yet), with
    ``custom_pipeline`` too, again after ``import genvis``; the genvis class; every component through its own class.
    The bare call names the loader module and ``trust_remote_code``. Every output equals the saved pipeline's."""
    script, get = exports
    folder, expected = get(family)
    outputs, report = _reload(script, "list", family, folder, tmp_path)
    loaders = {"diffusers", "diffusers_custom_pipeline", "diffusers_after_import_genvis", "genvis_class", "components"}
    _check_types(report, family, loaders)
    stem = "pipeline_lavin_dit" if family.startswith("lavin") else "pipeline_mvdit"
    assert "trust_remote_code" in report["plain_error"] and f"{stem}.py" in report["plain_error"]
    _assert_same_outputs(outputs, expected)


@pytest.mark.e2e
def test_string_layout_folders_still_load(exports, tmp_path):
    """A folder written before the switch (``"_class_name": "LaVinDiTPipeline"``) loads in the genvis class, its
    components and diffusers with ``custom_pipeline``; the bare call fails as diffusers does for any class it does not
    ship. (The demo's loader is checked on both layouts in tests/serve/test_handlers.py.)"""
    script, get = exports
    folder, expected = get("lavin-pixel", class_name_as_list=False)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "LaVinDiTPipeline"
    outputs, report = _reload(script, "string", "lavin-pixel", folder, tmp_path)
    _check_types(report, "lavin-pixel", {"diffusers_custom_pipeline", "genvis_class", "components"})
    assert report["plain_error"] == "AttributeError: module diffusers has no attribute LaVinDiTPipeline"
    _assert_same_outputs(outputs, expected)


def _assert_same_outputs(outputs: dict, expected: torch.Tensor) -> None:
    for loader, output in outputs.items():
        assert output.shape == expected.shape, f"{loader}: shape {tuple(output.shape)} != {tuple(expected.shape)}"
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5, msg=lambda m, loader=loader: f"{loader}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_folder_layout(exports, family):
    """model_index.json names the loader module; that module only imports genvis; components keep their entries."""
    _, get = exports
    folder, _ = get(family)
    index = json.loads((folder / "model_index.json").read_text())
    lavin = family.startswith("lavin")
    stem, cls = ("pipeline_lavin_dit", "LaVinDiTPipeline") if lavin else ("pipeline_mvdit", "MVDiTPipeline")
    assert index["_class_name"] == [stem, cls]  # diffusers' custom-pipeline layout: the loader module, the class
    loader = (folder / f"{stem}.py").read_text()
    imported = [line.split()[1] for line in loader.splitlines() if line.startswith(("import ", "from "))]
    assert imported and all(name == "genvis" or name.startswith("genvis.") for name in imported), imported
    vae_module = (
        "genvis.vae.autoencoder_st_vae" if family.endswith("st_vae") else "genvis.models.autoencoder_pixel_unshuffle"
    )
    assert index["vae"][0] == vae_module and vae_module in imported
    for name, entry in index.items():
        if not name.startswith("_"):
            assert (folder / name).is_dir(), f"component {name} ({entry}) has no folder"


def test_every_loadable_genvis_class_exposes_its_base_in_its_module():
    """diffusers finds a component's load method by looking the base classes up in the component's own module."""
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    import genvis

    bases = {}
    for library, names in LOADABLE_CLASSES.items():
        try:
            module = importlib.import_module(library)
        except ImportError:
            continue
        bases.update({name: getattr(module, name) for name in names if getattr(module, name, None) is not None})
    problems, checked = [], 0
    for info in pkgutil.walk_packages(genvis.__path__, "genvis."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # optional dependency missing: that module cannot be a component here either
            continue
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            for name, base in bases.items():
                if issubclass(cls, base):
                    checked += 1
                    if getattr(module, name, None) is not base:
                        problems.append(f"{module.__name__}.{cls.__name__}: module has no {name}")
    assert checked >= 5 and not problems, problems


@pytest.mark.e2e
def test_documented_loading_snippet_runs(exports, tmp_path):
    """docs/pipelines.md "Loading an export": its Python block runs as written on a LaVin export (path replaced)."""
    _, get = exports
    folder, _ = get("lavin-st_vae")
    docs = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    section = docs.split("## Loading an export", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('"runs/lavin_dit/pipeline"') == 3, "the documented snippet changed: update this test"
    code = snippet.replace('"runs/lavin_dit/pipeline"', repr(str(folder)))
    code += "\nassert type(pipe).__name__ == 'LaVinDiTPipeline' and type(transformer).__name__ == 'LaVinDiTTransformer3DModel'\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"documented snippet failed:\n{proc.stderr[-3000:]}"


def test_model_card_parses(exports, tmp_path):
    """Every export carries README.md with Hub front matter; the training command and metrics appear when passed."""
    from huggingface_hub import ModelCard

    from genvis.pipelines import read_model_card

    _, get = exports
    for family, tag in (("lavin-pixel", "image-to-image"), ("mvdit-pixel", "text-to-video")):
        folder, _ = get(family)
        front, body = read_model_card(folder)
        assert front["library_name"] == "diffusers" and front["pipeline_tag"] == tag
        assert front["license"] == "apache-2.0" and "genvis" in front["tags"]
        assert "trust_remote_code=True" in body and "| `transformer` |" in body
        card = ModelCard.load(folder / "README.md")  # the Hub's own parser
        assert card.data.library_name == "diffusers" and card.data.pipeline_tag == tag

    pipe = build_pipeline("lavin-pixel")
    command = "accelerate launch train/lavin_dit.py --config train/configs/lavin_dit/tiny.yaml"
    metrics = {"context_psnr": 21.3456, "tasks_beating_copy": 7, "note": "36 held-out episodes"}
    pipe.save_pretrained(
        tmp_path / "carded",
        model_card={"command": command, "metrics": metrics, "tags": ["tiny"], "license": "mit", "base_model": "x/y"},
    )
    front, body = read_model_card(tmp_path / "carded")
    assert (front["license"], front["base_model"]) == ("mit", "x/y") and front["tags"][-1] == "tiny"
    assert f"```bash\n{command}\n```" in body and "| context_psnr | 21.35 |" in body
    assert json.loads(body.split("```json\n", 1)[1].split("```", 1)[0]) == metrics
    docs = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    snippet = docs.split("## Model card", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('"runs/lavin_dit/pipeline"') == 1, "the documented snippet changed: update this test"
    exec(snippet.replace('"runs/lavin_dit/pipeline"', repr(str(tmp_path / "documented"))), {"pipe": pipe})
    front, body = read_model_card(tmp_path / "documented")
    assert front["tags"][-1] == "tiny" and "| tasks_beating_copy | 7 |" in body and "train/lavin_dit.py" in body
    with pytest.raises(ValueError, match=r"model_card: unknown options \['metric'\]"):
        pipe.save_pretrained(tmp_path / "bad", model_card={"metric": {}})
    with pytest.raises(ValueError, match=r"\['repo_id'\] only apply with push_to_hub=True"):
        pipe.save_pretrained(tmp_path / "bad", repo_id="me/x")
