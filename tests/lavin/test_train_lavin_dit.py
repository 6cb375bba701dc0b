"""The LaVin-DiT training path: tiny overfit, context length, and train/lavin_dit.py (config, DDP, kill + resume).

The overfit and context tests train in-process with the same genvis pieces the script uses (encode_episodes,
RectifiedFlow, sample_generators, LaVinDiTPipeline, evaluate_in_context); the e2e tests launch the script itself with
``accelerate launch`` on tiny settings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genvis.models import LaVinDiTTransformer3DModel
from genvis.training import load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "train" / "lavin_dit.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_lavin_dit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_default_preset_file_matches_the_config_dataclass():
    script = _load_script()
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
