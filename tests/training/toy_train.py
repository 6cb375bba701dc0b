"""A minimal training script on genvis.training, used by the checkpoint/resume tests (run as a subprocess).

Usage: python toy_train.py OUT_DIR --steps N --save-every K [--stall-save-at STEP] [--nan-at STEP ...]
Writes one JSON line per optimizer step to OUT_DIR/steps.jsonl: step, loss, sample indices.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from genvis.training import CheckpointManager, NonFiniteGuard, create_ema, progress_bar, setup_accelerator


def batch_for(step: int, batch_size: int = 4):
    # map-style deterministic data order: the batch is a function of the step alone
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch_size, 8, generator=g)
    return x, x @ torch.linspace(-1, 1, 8)[:, None] + 0.1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--stall-save-at", type=int, default=-1)
    parser.add_argument("--nan-at", type=int, nargs="*", default=[])
    parser.add_argument("--total-limit", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    acc = setup_accelerator(out, seed=0, log_with=None)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    ema = create_ema(acc.unwrap_model(model), acc, decay=0.9)
    ckpt = CheckpointManager(acc, out / "checkpoints", total_limit=args.total_limit)
    guard = NonFiniteGuard(acc, max_consecutive=3)

    def stall_hook(models, weights, output_dir):
        if ckpt.state.step == args.stall_save_at:
            (out / "stalling").write_text(output_dir)
            time.sleep(60)  # the test kills the process here, in the middle of the save

    acc.register_save_state_pre_hook(stall_hook)
    resumed = ckpt.resume()
    with open(out / "steps.jsonl", "a") as log:
        if resumed:
            log.write(json.dumps({"resumed_from": str(resumed), "step": ckpt.state.step}) + "\n")
        bar = progress_bar(acc, args.steps, ckpt.state.step)
        while ckpt.state.step < args.steps:
            x, y = batch_for(ckpt.state.step)
            if ckpt.state.step in args.nan_at:
                x = x * float("nan")
            loss = nn.functional.mse_loss(model(x), y)
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
            if guard.check(loss, grad_norm, step=ckpt.state.step):
                opt.step()
                ema.step(acc.unwrap_model(model).parameters())
            else:
                ckpt.state.skipped_steps += 1
            opt.zero_grad()
            ckpt.state.step += 1
            log.write(json.dumps({"step": ckpt.state.step, "loss": loss.item()}) + "\n")
            log.flush()
            bar.update(1)
            if ckpt.state.step % args.save_every == 0:
                ckpt.save()
    weights = torch.cat([p.detach().flatten() for p in acc.unwrap_model(model).parameters()])
    torch.save({"weights": weights, "skipped": ckpt.state.skipped_steps}, out / "final.pt")


if __name__ == "__main__":
    main()
