"""train/st_vae.py: resume equals an uninterrupted run, PSNR report, grids, export; the GAN phase runs."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genvis.vae import AutoencoderKLSTVAE, latent_normalization

REPO = Path(__file__).resolve().parents[2]


def _script_main():
    sys.path.insert(0, str(REPO / "train"))
    try:
        import st_vae as script
    finally:
        sys.path.pop(0)
    return script.main


def _args(output_dir: Path, *extra: str) -> list[str]:
    settings = {
        "output_dir": output_dir,
        "data.size": 16,
        "data.image_batch_size": 2,
        "data.video_batch_size": 1,
        "data.video_start_step": 1,
        "data.video_every": 2,  # steps 1 and 3 are video batches
        "data.eval_images": 2,
        "data.eval_videos": 1,
        "data.normalization_batches": 1,
        "optim.warmup_steps": 1,
        "checkpoint.every_steps": 2,
        "logging.every_steps": 1,
        "logging.eval_every_steps": 4,
        "logging.log_with": "null",
    }
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    return args + [item for setting in extra for item in ("--set", setting)]


@pytest.mark.slow
def test_resume_equals_uninterrupted_run_and_exports(tmp_path):
    main = _script_main()
    straight = main(_args(tmp_path / "straight", "schedule.max_steps=4"))
    assert set(straight) == {"eval/psnr_images", "eval/psnr_videos"}
    main(_args(tmp_path / "resumed", "schedule.max_steps=4", "schedule.stop_at_step=2"))  # interrupted
    main(_args(tmp_path / "resumed", "schedule.max_steps=4"))
    expected = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint-00000004" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-00000004" / "model.safetensors")
    assert expected.keys() == got.keys() and len(expected) > 100
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key

    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["eval/psnr_images"] > 0
    assert metrics["reference/psnr_images_bicubic_x8"] > metrics["reference/psnr_images_mean_colour"]
    assert (tmp_path / "straight" / "samples" / "reconstructions-00000004.png").is_file()
    vae = AutoencoderKLSTVAE.from_pretrained(tmp_path / "straight" / "vae")
    shift, scale = latent_normalization(vae)
    assert scale != 1.0 and shift != 0.0  # estimated from data, not the preset's placeholders
    assert (tmp_path / "straight" / "checkpoints" / "checkpoint-00000004" / "vae" / "config.json").is_file()


@pytest.mark.slow
def test_gan_phase_trains_the_discriminator(tmp_path):
    main = _script_main()
    metrics = main(
        _args(
            tmp_path / "gan",
            "schedule.max_steps=2",
            "loss.gan_start_step=1",
            "loss.disc_base_channels=8",
            "loss.disc_num_layers=2",
        )
    )
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert (tmp_path / "gan" / "discriminator" / "config.json").is_file()


def test_model_overrides_reach_the_exported_vae(tmp_path):
    main = _script_main()
    main(_args(tmp_path / "wide", "schedule.max_steps=1", "model.overrides={block_out_channels: [16, 16, 32, 32]}"))
    config = json.loads((tmp_path / "wide" / "vae" / "config.json").read_text())
    assert config["block_out_channels"] == [16, 16, 32, 32]
