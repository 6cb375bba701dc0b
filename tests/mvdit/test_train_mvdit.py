"""MVDiT training: a tiny overfit on captioned clips, and train/mvdit.py (resume == uninterrupted, accelerate launch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genvis.data import procedural_video
from genvis.diffusion.text_to_video import TextToVideoObjective
from genvis.models.autoencoder_pixel_unshuffle import PixelUnshuffleAutoencoder
from genvis.models.mvdit import MVDIT_PRESETS, MVDiTTransformer3DModel
from genvis.pipelines.model_card import read_model_card
from genvis.pipelines.pipeline_mvdit import MVDiTPipeline, encode_video_latents, export_video
from genvis.text import encode_prompts, load_text_encoder, text_embed_dim

REPO = Path(__file__).resolve().parents[2]
SLOW_STEPS = 250  # test_default_preset_follows_captions_on_a_small_budget: about a minute on 2 cores


@pytest.mark.slow
def test_overfit_captioned_clips(tmp_path):
    # three clips with different shapes, motions and backgrounds; exact captions from the generator
    clips = [
        procedural_video(seed, num_frames=4, size=16, num_shapes=(1, 1), camera_pan_probability=0.0)
        for seed in (1, 2, 4)
    ]
    captions = [clip.caption for clip in clips]
    assert len(set(captions)) == 3
    video = torch.stack([torch.from_numpy(c.frames).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
    vae = PixelUnshuffleAutoencoder(spatial_compression_ratio=4)  # exact: distances are measured on real pixels
    latents = encode_video_latents(vae, video)  # (3, 48, 4, 4, 4)
    tokenizer, encoder = load_text_encoder("tiny-t5")
    text, mask = encode_prompts(tokenizer, encoder, captions, 48)
    objective = TextToVideoObjective("flow", caption_dropout=0.1)
    model = MVDiTTransformer3DModel(
        **{
            **MVDIT_PRESETS["tiny"],
            "in_channels": 48,
            "attention_head_dim": 32,
            "text_embed_dim": text_embed_dim(encoder),
            "max_text_length": 48,
            "sample_size": 4,
            "learn_sigma": False,
        }
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(400):
        loss = objective.training_loss(model, latents, text, mask, generator=generator).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:10]), (losses[:10], losses[-50:])

    pipe = MVDiTPipeline(tokenizer, encoder, model.eval(), vae, objective.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        captions,
        num_frames=4,
        height=16,
        width=16,
        num_inference_steps=20,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames  # (3, T, 3, H, W) in [0, 1]
    generated = frames.permute(0, 2, 1, 3, 4) * 2 - 1  # (3, 3, T, H, W) in [-1, 1]
    distance = (generated[:, None] - video[None]).square().mean((2, 3, 4, 5))  # (generated i, training video j)
    for index, clip_frames in enumerate(frames):
        export_video(clip_frames, tmp_path / f"overfit-{index}.gif", fps=4)
    assert distance.argmin(dim=1).tolist() == [0, 1, 2], distance
    # and clearly so: every generated clip is at least 1.5x closer to its own video than to any other
    own = distance.diagonal()
    others = distance + torch.diag(torch.full((3,), float("inf")))
    assert (others.min(dim=1).values > 1.5 * own).all(), distance


# -------------------------------------------------------------------------------------------------------------------
# train/mvdit.py


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory) -> Path:
    from data_pipelines.datasets import ensure_builtin_shards

    root = tmp_path_factory.mktemp("mvdit_data")
    ensure_builtin_shards(root, num_videos=8, num_frames=17, size=64, real_videos=False, num_workers=1)
    return root


def _script_main():
    sys.path.insert(0, str(REPO / "train"))
    try:
        import mvdit as script
    finally:
        sys.path.pop(0)
    return script.main


def _fast_args(output_dir: Path, data_root: Path, *extra: str) -> list[str]:
    settings = {
        "output_dir": output_dir,
        "data.builtin_root": data_root,
        "text.encoder": "tiny-t5",
        "text.max_length": 24,
        "vae.kind": "pixel",
        "data.size": 16,
        "data.num_frames": 4,
        "data.batch_size": 2,
        "data.batches_per_epoch": 3,
        "optim.warmup_steps": 1,
        "checkpoint.every_steps": 2,
        "logging.every_steps": 1,
        "logging.sample_every_steps": 4,
        "logging.log_with": "null",
        "sampling.num_inference_steps": 2,
        "data.captions": "random",  # the fixture's random-caption clips (the default preset uses combinations)
        "data.held_out_combinations": 0,
    }
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    return args + [item for setting in extra for item in ("--set", setting)]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    weights = load_file(checkpoint / "model.safetensors")
    weights.update(
        {
            f"ema.{k}": v
            for k, v in load_file(next((checkpoint / "pipeline" / "transformer").glob("*.safetensors"))).items()
        }
    )
    return weights


def test_script_resume_equals_uninterrupted_run(builtin_root, tmp_path):
    main = _script_main()
    straight = main(_fast_args(tmp_path / "straight", builtin_root, "schedule.max_steps=4"))
    assert straight["step"] == 4 and np.isfinite(straight["last_loss"])
    # interrupted after the step-2 checkpoint, then resumed to step 4 (crossing the 3-batch epoch boundary)
    main(_fast_args(tmp_path / "resumed", builtin_root, "schedule.max_steps=2"))
    resumed = main(_fast_args(tmp_path / "resumed", builtin_root, "schedule.max_steps=4"))
    assert resumed["step"] == 4
    expected = _weights(tmp_path / "straight" / "checkpoints" / "checkpoint-00000004")
    got = _weights(tmp_path / "resumed" / "checkpoints" / "checkpoint-00000004")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key

    # sample videos and an exported pipeline that loads and generates
    samples = tmp_path / "straight" / "samples"
    assert {p.suffix for p in samples.iterdir()} >= {".mp4", ".gif", ".txt", ".png"}
    pipe = MVDiTPipeline.from_pretrained(tmp_path / "straight" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle moves left to right", num_frames=4, height=16, width=16, num_inference_steps=2)
    assert len(out.frames[0]) == 4


def _sets(*settings: str) -> list[str]:
    return [item for setting in settings for item in ("--set", setting)]


def test_st_vae_preset_refuses_a_random_init_vae(tmp_path):
    main = _script_main()
    preset = str(REPO / "train" / "configs" / "mvdit" / "tiny_st_vae.yaml")
    with pytest.raises(ValueError, match=r"vae\.pretrained"):
        main(["--config", preset, *_sets(f"output_dir={tmp_path}", "logging.log_with=null")])
    with pytest.raises(ValueError, match=r"vae\.pretrained"):
        main(_sets(f"output_dir={tmp_path}", "logging.log_with=null", "vae.kind=image"))


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        # regression: the old tiny_pixel preset (4x pixel unshuffle = 48 channels x 2 x 2 = 192 values per token
        # through width 32) ran and never learned (DDPM loss stuck at 0.88, noise samples); it must refuse to start
        (("vae.pixel_factor=4", "model.overrides.num_attention_heads=2"), r"model\.overrides"),
        (
            ("vae.pixel_factor=2", "data.size=34"),
            r"data\.size",
        ),  # 17 latent px: fine for the VAE, not for 2 x 2 patches
        (("vae.pixel_factor=2", "data.size=33"), r"data\.size"),  # not divisible by the unshuffle factor
        (("data.size=33",), r"data\.size"),  # raw pixels, odd size: not divisible by the 2 x 2 patches
        (("data.colors=[]",), r"data\.colors"),  # empty caption set
        (("data.colors=[blue]",), r"data\.colors"),  # blue is a background colour
        (("data.held_out_combinations=500",), r"data\.held_out_combinations: "),
        (("data.captions=all",), r"data\.captions"),
        (("data.captions=random",), r"data\.held_out_combinations"),
    ],
)
def test_configs_that_cannot_learn_fail_at_start_up(tmp_path, settings, field):
    main = _script_main()
    with pytest.raises(ValueError, match=field):
        main(
            _sets(f"output_dir={tmp_path}", "logging.log_with=null", f"data.builtin_root={tmp_path / 'd'}", *settings)
        )
    assert not (tmp_path / "d").exists()  # nothing was built


@pytest.mark.slow
@pytest.mark.e2e
def test_accelerate_launch_default_preset(tmp_path):
    """The default preset (pixel space, caption combinations, rectified flow) through ``accelerate launch``,
    on a small budget: it builds its data, trains, and writes the caption-following scores and labelled grids."""
    output_dir = tmp_path / "run"
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes=1",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        str(REPO / "train" / "mvdit.py"),
        *_sets(f"output_dir={output_dir}", f"data.builtin_root={tmp_path / 'data'}", "data.clips_per_combination=1"),
        *_sets("schedule.max_steps=2", "checkpoint.every_steps=2", "logging.sample_every_steps=2"),
        *_sets("sampling.num_inference_steps=2", "data.batch_size=2", "evaluation.num_train_captions=4"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and np.isfinite(metrics["last_loss"])
    config = json.loads((output_dir / "pipeline" / "transformer" / "config.json").read_text())
    assert not config["learn_sigma"] and config["in_channels"] == 3 and config["text_embed_dim"] == 384
    scores = json.loads((output_dir / "caption_eval.json").read_text())
    assert scores["num_trained"] == 4 and scores["num_held_out"] > 0
    for key in ("trained", "held_out", "chance", "shuffled_captions", "shuffled_captions_held_out"):
        assert set(scores[key]) == {"background", "color", "kind", "motion", "all"}, key
    assert (output_dir / "samples" / "caption_eval-00000002.png").is_file()
    assert (output_dir / "samples" / "samples-00000002.png").is_file()
    # the export's model card names the command that trained it and the caption-following scores
    front, body = read_model_card(output_dir / "pipeline")
    assert front["library_name"] == "diffusers" and "train/mvdit.py" in body and "schedule.max_steps=2" in body
    assert "held_out/background" in body and "trained/motion" in body


@pytest.mark.slow
def test_default_preset_follows_captions_on_a_small_budget(tmp_path):
    """Issue 12 regression: the default preset, on a budget of about a minute, makes clips whose background and
    shape colour an analyser of the generator's rules reads back on trained AND held-out caption combinations.

    Measured on the old recipe (4x pixel unshuffle through width 32, DDPM; the same data and 300 steps): background
    0.42, shape colour 0.0 (chance 0.33) with noise samples; such a config now refuses to start (test above).
    """
    main = _script_main()
    summary = main(
        _sets(
            f"output_dir={tmp_path / 'run'}",
            f"data.builtin_root={tmp_path / 'data'}",
            "logging.log_with=null",
            f"schedule.max_steps={SLOW_STEPS}",
            "data.clips_per_combination=2",
            "logging.sample_every_steps=0",
            "checkpoint.every_steps=100000",
            "sampling.num_inference_steps=10",
        )
    )
    scores = summary["caption_following"]
    print(json.dumps(scores))  # measured on a shared 2-core CPU: see docs/mvdit.md
    trained, held_out, chance = scores["trained"], scores["held_out"], scores["chance"]
    assert trained["background"] >= chance["background"] + 0.5, scores
    assert held_out["background"] >= chance["background"] + 0.4, scores
    assert trained["color"] >= chance["color"] + 0.3, scores
    assert held_out["color"] >= chance["color"] + 0.25, scores


def test_builtin_root_with_other_captions_is_not_reused(tmp_path):
    from data_pipelines.datasets import ensure_builtin_shards
    from genvis.data.builtin import VideoAttributes

    clips = [VideoAttributes("blue", "red", "circle", "left to right")]
    options = {"num_frames": 17, "size": 64, "real_videos": False, "num_workers": 1}
    shards = ensure_builtin_shards(tmp_path, attributes=clips, **options)
    assert ensure_builtin_shards(tmp_path, attributes=clips, **options) == shards  # same settings: reused
    with pytest.raises(ValueError, match="builtin_root"):
        ensure_builtin_shards(tmp_path, attributes=[clips[0]._replace(color="green")], **options)
    with pytest.raises(ValueError, match="builtin_root"):
        ensure_builtin_shards(tmp_path, **options)  # random captions on a combinations folder


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "train" / "configs" / "mvdit").glob("*.yaml")))
def test_every_preset_loads_and_states_its_expectations(preset):
    sys.path.insert(0, str(REPO / "train"))
    try:
        import mvdit as script
    finally:
        sys.path.pop(0)
    from genvis.training.config import load_config

    path = REPO / "train" / "configs" / "mvdit" / preset
    config = load_config(script.TrainConfig, path)
    if config.vae.kind == "pixel":  # the others need a trained VAE folder
        script.check_config(config)
    header = path.read_text().split("output_dir:")[0]
    assert "accelerate launch train/mvdit.py" in header and "Expected" in header
