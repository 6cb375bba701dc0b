import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from genvis.training import CheckpointError, CheckpointManager, find_latest_checkpoint, setup_accelerator

TOY = Path(__file__).with_name("toy_train.py")


def run_toy(out, *args, wait=True):
    cmd = [sys.executable, str(TOY), str(out), *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_losses(out):
    lines = [json.loads(line) for line in (Path(out) / "steps.jsonl").read_text().splitlines()]
    return {d["step"]: d["loss"] for d in lines if "loss" in d}, [d for d in lines if "resumed_from" in d]


@pytest.fixture
def accelerator(tmp_path):
    AcceleratorState._reset_state(True)
    yield setup_accelerator(tmp_path / "run", log_with=None)
    AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_kill_during_save_resumes_from_previous_and_matches_uninterrupted(tmp_path):
    reference = run_toy(tmp_path / "ref", "--steps", 15, "--save-every", 5)
    assert reference.returncode == 0, reference.stderr
    ref_losses, _ = read_losses(tmp_path / "ref")

    out = tmp_path / "killed"
    proc = run_toy(out, "--steps", 15, "--save-every", 5, "--stall-save-at", 10, "--total-limit", 1, wait=False)
    deadline = time.time() + 90
    while not (out / "stalling").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "toy run never reached the stalled save"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the interrupted save left a temp folder; the newest complete checkpoint is still step 5
    assert (out / "checkpoints" / "checkpoint-00000010.tmp").exists()
    assert find_latest_checkpoint(out / "checkpoints").name == "checkpoint-00000005"

    resumed = run_toy(out, "--steps", 15, "--save-every", 5, "--total-limit", 1)
    assert resumed.returncode == 0, resumed.stderr
    losses, resumes = read_losses(out)
    assert resumes[0]["step"] == 5 and resumes[0]["resumed_from"].endswith("checkpoint-00000005")
    for step in range(6, 16):  # replayed steps after resume equal the uninterrupted run
        assert losses[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    final_ref = torch.load(tmp_path / "ref" / "final.pt")["weights"]
    torch.testing.assert_close(torch.load(out / "final.pt")["weights"], final_ref, atol=1e-6, rtol=0)
    # total_limit=1 keeps exactly the newest complete checkpoint, and the stale temp folder is gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000015"]


@pytest.mark.slow
def test_nan_steps_are_skipped_and_consecutive_nans_abort(tmp_path):
    ok = run_toy(tmp_path / "one", "--steps", 6, "--save-every", 3, "--nan-at", 2)
    assert ok.returncode == 0, ok.stderr
    final = torch.load(tmp_path / "one" / "final.pt")
    assert final["skipped"] == 1 and torch.isfinite(final["weights"]).all()

    bad = run_toy(tmp_path / "many", "--steps", 10, "--save-every", 2, "--nan-at", 3, 4, 5)
    assert bad.returncode != 0
    assert "3 consecutive non-finite steps at step 5" in bad.stderr
    latest = find_latest_checkpoint(tmp_path / "many" / "checkpoints")
    # the step-4 save came after two skipped steps: it exists and holds the last finite weights
    assert latest.name == "checkpoint-00000004"
    saved = load_file(latest / "model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "many" / "final.pt").exists()


def test_corrupt_checkpoint_is_reported_and_skipped(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    manager = CheckpointManager(accelerator, tmp_path / "ckpt", total_limit=None)
    for step in (1, 2):
        manager.state.step = step
        manager.save()
    newest = tmp_path / "ckpt" / "checkpoint-00000002" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # flip bits, same size
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch, expected [0-9a-f]{64}, got"):
        manager.resume(tmp_path / "ckpt" / "checkpoint-00000002")
    manager.state.step = 0
    assert manager.resume().name == "checkpoint-00000001"
    assert manager.state.step == 1
    assert model.weight.isfinite().all()


def test_refuses_to_save_non_finite_weights(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    manager = CheckpointManager(accelerator, tmp_path / "ckpt")
    manager.state.step = 1
    manager.save()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    manager.state.step = 2
    with pytest.raises(CheckpointError, match="non-finite values in 'weight'"):
        manager.save()
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["checkpoint-00000001"]


def test_total_limit_prunes_only_after_complete_save(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(2, 2))
    manager = CheckpointManager(accelerator, tmp_path / "ckpt", total_limit=2)
    for step in range(1, 5):
        manager.state.step = step
        manager.save()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-00000003", "checkpoint-00000004"]
    with pytest.raises(ValueError, match="total_limit"):
        CheckpointManager(accelerator, tmp_path / "x", total_limit=0)
