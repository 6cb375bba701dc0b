"""The LaVin-DiT training path: tiny overfit, context length, and train/lavin_dit.py (config, DDP, kill + resume).

The overfit and context tests train in-process with the same genvis pieces the script uses (encode_episodes,
RectifiedFlow, sample_generators, LaVinDiTPipeline, evaluate_in_context); the e2e tests launch the script itself with
``accelerate launch`` on tiny settings.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genvis.diffusion import RectifiedFlow, encode_episodes, sample_generators
from genvis.models import LaVinDiTTransformer3DModel, PixelUnshuffleAutoencoder
from genvis.pipelines import LaVinDiTPipeline, evaluate_in_context
from genvis.pipelines.model_card import read_model_card
from genvis.tasks import TaskMixture, sample_episode
from genvis.training import load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "train" / "lavin_dit.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"


# ---------------------------------------------------------------------------------------------------------------
# In-process tiny training (the script's pieces): overfit and context length
# ---------------------------------------------------------------------------------------------------------------

TASKS = ["depth_order", "edge_detection"]  # copying the query is a poor answer for both: a model must use the pairs
LOSS_DROP = 2.5  # stated factor: mean loss of the last 25 steps <= mean of the first 25 / 2.5


@pytest.fixture(scope="module")
def trained():
    """A 2-block J-DiT trained 400 full-batch steps on 8 fixed episodes (1-3 pairs, 16 px) of TASKS, pixel space."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread sync costs more than it saves (20x on a loaded 2-core box)
    try:
        yield _train_tiny()
    finally:
        torch.set_num_threads(threads)


def _train_tiny():
    torch.manual_seed(0)
    pool = [TaskMixture(tasks=TASKS, num_pairs=(1, 3), size=16, seed=0)[i] for i in range(8)]
    vae = PixelUnshuffleAutoencoder()
    model = LaVinDiTTransformer3DModel(
        in_channels=12, num_layers=2, num_attention_heads=4, num_kv_heads=2, attention_head_dim=12
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    flow = RectifiedFlow(context_dropout=0.1)
    latents = encode_episodes(vae, pool)
    losses, batch = [], len(pool)
    for step in range(400):
        ids = list(range(batch))
        result = flow.training_loss(
            model,
            [latents.targets[i] for i in ids],
            [latents.contexts[i] for i in ids],
            generator=sample_generators(0, [step * batch + i for i in range(batch)]),
            query_frames=[latents.query_frames[i] for i in ids],
        )
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(result.loss.item())
    pipe = LaVinDiTPipeline(model.eval(), vae, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, pool, losses


@pytest.mark.slow
def test_tiny_overfit_loss_falls_and_samples_beat_copying_the_input(trained):
    pipe, pool, losses = trained
    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    assert last <= first / LOSS_DROP, (first, last)
    scores = evaluate_in_context(pipe, pool, num_inference_steps=10, guidance_scale=1.0)
    assert set(scores) == set(TASKS)
    assert scores["depth_order"].psnr > scores["depth_order"].psnr_copy + 1.0, scores
    assert scores["edge_detection"].iou > scores["edge_detection"].iou_copy, scores


@pytest.mark.slow
def test_more_context_pairs_does_not_hurt_on_held_out_episodes(trained):
    pipe, _, _ = trained
    # held-out sources; the same queries answered from their first pair only and from all three pairs
    three = [sample_episode(task, 3, seed=seed, size=16, split="test") for task in TASKS for seed in range(8)]
    one = []
    for episode in three:
        single = copy.copy(episode)
        single.context_pairs = episode.context_pairs[:1]
        one.append(single)
    scores_three = evaluate_in_context(pipe, three, num_inference_steps=10, guidance_scale=1.0)
    scores_one = evaluate_in_context(pipe, one, num_inference_steps=10, guidance_scale=1.0)
    mean_three = sum(s.psnr for s in scores_three.values()) / len(TASKS)
    mean_one = sum(s.psnr for s in scores_one.values()) / len(TASKS)
    assert mean_three >= mean_one - 0.5, (scores_one, scores_three)


def test_default_preset_file_matches_the_config_dataclass(lavin_script):
    script = lavin_script
    assert load_config(script.TrainConfig, script.DEFAULT_CONFIG) == script.TrainConfig()


# ---------------------------------------------------------------------------------------------------------------
# e2e: accelerate launch train/lavin_dit.py
# ---------------------------------------------------------------------------------------------------------------

FAST = [
    "data.size=16",
    "data.num_workers=0",
    "data.tasks=[foreground_segmentation,colorization,depth_order]",
    "model.num_layers=1",
    "schedule.batch_size=4",
    "sampling.episodes_per_task=0",
    "sampling.reliance=false",
    "logging.every_steps=1",
    "logging.log_with=null",
    "checkpoint.every_steps=2",
    "flow.context_dropout=0.5",  # exercise the packed path with dropped contexts
]


def _command(out: Path, steps: int, processes: int = 1) -> list[str]:
    launcher = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
    overrides = [f"output_dir={out}", f"schedule.max_steps={steps}", *FAST]
    return [str(ACCELERATE), "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", str(SCRIPT), *(arg for o in overrides for arg in ("--set", o))]  # fmt: skip


def _env() -> dict[str, str]:
    # one thread per process: 1 and 2 processes then use the same kernels
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(out: Path, steps: int, processes: int = 1) -> None:
    result = subprocess.run(_command(out, steps, processes), env=_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {entry["step"]: entry["train/loss"] for entry in _log(out) if "train/loss" in entry}


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return LaVinDiTTransformer3DModel.from_pretrained(out / "pipeline" / "transformer").state_dict()


@pytest.mark.slow
@pytest.mark.e2e
def test_two_process_ddp_matches_one_process(tmp_path):
    _run(tmp_path / "one", steps=3, processes=1)
    _run(tmp_path / "two", steps=3, processes=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert {e["train/processes"] for e in _log(tmp_path / "two") if "train/processes" in e} == {2}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    w1, w2 = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-00000002" / "COMPLETE.json").is_file()
    front, body = read_model_card(tmp_path / "one" / "pipeline")  # the export names the command that trained it
    assert front["library_name"] == "diffusers" and "train/lavin_dit.py" in body and "schedule.max_steps=3" in body


@pytest.mark.slow
@pytest.mark.e2e
def test_killed_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    steps = 6
    _run(tmp_path / "reference", steps)
    out = tmp_path / "killed"
    process = subprocess.Popen(_command(out, steps), env=_env(), cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = out / "checkpoints" / "checkpoint-00000002" / "COMPLETE.json"
    deadline = time.time() + 240
    while not marker.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert marker.is_file()
    assert not (out / "pipeline").exists(), "the run finished before it was killed"

    _run(out, steps)
    log = _log(out)
    resumed = [e for e in log if "resumed_from" in e]
    assert len(resumed) == 1 and resumed[0]["step"] >= 2
    after = [e for e in log[log.index(resumed[0]) + 1 :] if "train/loss" in e]
    reference = _losses(tmp_path / "reference")
    assert [e["step"] for e in after] == list(range(resumed[0]["step"] + 1, steps + 1))
    for entry in after:  # same data order, same per-sample noise, same weights -> same losses
        assert entry["train/loss"] == pytest.approx(reference[entry["step"]], rel=1e-5, abs=1e-6)
    ref_weights, weights = _final_weights(tmp_path / "reference"), _final_weights(out)
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)
