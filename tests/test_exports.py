"""Pipeline exports reload in a fresh process through every loader a user reaches for, and give the same output.

Each family (LaVin-DiT with the pixel autoencoder / the ST-VAE, MVDiT with the ST-VAE / pixels) is built here from
tiny random-init genvis classes, ``save_pretrained`` to a folder, then reloaded in a *new* Python process by

- ``genvis_class``: the genvis pipeline class ``from_pretrained``, then every component on its own with
  ``<class>.from_pretrained(folder, subfolder=<name>)`` (the ``[library, class]`` entry of model_index.json) and the
  pipeline assembled from them;
- ``diffusers``: ``diffusers.DiffusionPipeline.from_pretrained(folder, custom_pipeline=<loader module>,
  trust_remote_code=True)`` with genvis never imported by the caller (the folder's loader module imports it); the
  bare ``DiffusionPipeline.from_pretrained(folder)`` is checked to fail as diffusers does for any class it does not
  ship (it imports no module a folder names);
- ``diffusers_after_import_genvis``: the same after ``import genvis``.

Every reload must reproduce the original pipeline's output for the same seed. See docs/pipelines.md.
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


def main(mode, family, folder, out):
    report = {}
    if mode == "genvis_class":
        lavin = family.startswith("lavin")
        module = importlib.import_module(f"genvis.pipelines.pipeline_{'lavin_dit' if lavin else 'mvdit'}")
        pipeline_class = getattr(module, "LaVinDiTPipeline" if lavin else "MVDiTPipeline")
        pipe = pipeline_class.from_pretrained(folder)
        outputs = {"genvis_class": run(pipe, family)}
        index, components = load_components(folder)
        outputs["components"] = run(pipeline_class(**components), family)
        report["component_types"] = {name: f"{type(c).__module__}.{type(c).__name__}" for name, c in components.items()}
    else:
        if mode == "diffusers_after_import_genvis":
            import genvis  # noqa: F401
        else:
            assert not any(m == "genvis" or m.startswith("genvis.") for m in sys.modules), "genvis imported too early"
        from diffusers import DiffusionPipeline

        try:  # diffusers runs no code a folder names unless told to: the bare call cannot reach genvis
            DiffusionPipeline.from_pretrained(folder)
            report["plain_error"] = None
        except (AttributeError, ValueError) as err:
            report["plain_error"] = f"{type(err).__name__}: {err}"
        if mode == "diffusers_class_name_list":  # "_class_name": [module file, class]
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        else:
            stem = "pipeline_lavin_dit" if family.startswith("lavin") else "pipeline_mvdit"
            pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=stem, trust_remote_code=True)
        outputs = {mode: run(pipe, family)}
    report["pipeline_type"] = type(pipe).__module__ + "." + type(pipe).__name__
    report["component_types_pipe"] = {name: f"{type(c).__module__}.{type(c).__name__}"
                                      for name, c in pipe.components.items()}
    torch.save(outputs, out)
    with open(out + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
'''

FAMILIES = ["lavin-pixel", "lavin-st_vae", "mvdit-st_vae", "mvdit-pixel"]
MODES = ["genvis_class", "diffusers", "diffusers_after_import_genvis"]


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
    """``family -> (folder, reference output)``, each written once for the module."""
    script = tmp_path_factory.mktemp("script") / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    run = runpy.run_path(str(script), run_name="reload")["run"]
    cache: dict[tuple[str, bool], tuple[Path, torch.Tensor]] = {}

    def get(family: str, class_name_as_list: bool = False):
        key = (family, class_name_as_list)
        if key not in cache:
            pipe = build_pipeline(family)
            pipe._class_name_as_list = class_name_as_list
            folder = tmp_path_factory.mktemp(family)
            pipe.save_pretrained(folder)
            cache[key] = (folder, run(pipe, family))
        return cache[key]

    return script, get


def _reload(script: Path, mode: str, family: str, folder: Path, tmp_path: Path):
    out = tmp_path / "out.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, str(script), mode, family, str(folder), str(out)],
        cwd=tmp_path,  # genvis comes from the installed package, not from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{mode} reload of {family} failed:\n{proc.stderr[-4000:]}"
    return torch.load(out), json.loads(Path(f"{out}.json").read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_a_fresh_process(exports, tmp_path, family, mode):
    script, get = exports
    folder, expected = get(family)
    outputs, report = _reload(script, mode, family, folder, tmp_path)
    cls = "LaVinDiTPipeline" if family.startswith("lavin") else "MVDiTPipeline"
    assert report["pipeline_type"].endswith(f".{cls}")
    vae_class = "AutoencoderKLSTVAE" if family.endswith("st_vae") else "PixelUnshuffleAutoencoder"
    assert report["component_types_pipe"]["vae"].endswith(vae_class)
    if mode != "genvis_class":  # a bare class name resolves inside diffusers only
        assert report["plain_error"] == f"AttributeError: module diffusers has no attribute {cls}"
    _assert_same_outputs(outputs, expected)


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["lavin-pixel", "mvdit-st_vae"])
def test_class_name_list_form_needs_only_trust_remote_code(exports, tmp_path, family):
    """With ``_class_name_as_list`` the folder is diffusers' custom-pipeline layout: ``trust_remote_code=True`` alone
    loads it, the bare call names the loader module, and the genvis class still loads it without running it."""
    script, get = exports
    folder, expected = get(family, class_name_as_list=True)
    stem = "pipeline_lavin_dit" if family.startswith("lavin") else "pipeline_mvdit"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"][0] == stem
    outputs, report = _reload(script, "diffusers_class_name_list", family, folder, tmp_path)
    assert "trust_remote_code" in report["plain_error"] and f"{stem}.py" in report["plain_error"]
    _assert_same_outputs(outputs, expected)
    outputs, _ = _reload(script, "genvis_class", family, folder, tmp_path)
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
    assert index["_class_name"] == cls  # what serve/loading.py and other readers of model_index.json expect
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
