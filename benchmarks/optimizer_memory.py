"""SGD-SaI vs AdamW: optimizer-state memory on the LaVin-DiT presets and held-out loss after N steps on the tiny task.

Memory: bytes of the optimizer's state tensors once every parameter has been stepped. For the ``tiny`` preset it is
measured on a real model after one step (and checked against the shape formula); for ``0.1B`` (and ``1.0B``) the
model is built on the meta device and counted from parameter shapes with ``expected_state_bytes`` (fp32 parameters).
Loss: the tiny LaVin-DiT in-context task of benchmarks/repa.py, same initial weights, batches, times and noise; AdamW
at lr 1e-3 against SGD-SaI at a few base rates (its effective rate is ``lr * g-SNR`` per tensor). One intra-op thread.

    python benchmarks/optimizer_memory.py [--steps 300 --sgd-lrs 1e-4 3e-4 1e-3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lavin_task import build_model, build_task, train

from genvis.models import LaVinDiTTransformer3DModel
from genvis.training.optim import build_optimizer, expected_state_bytes, optimizer_state_bytes


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sgd-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("optimizer state (fp32 parameters)")
    print(f"{'preset':7s} {'params':>12s} {'AdamW':>14s} {'SGD-SaI':>14s} {'ratio':>6s}  how")
    model = build_model(seed=0)
    measured = {}
    for name in ("adamw", "sgd_sai"):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer = build_optimizer(name, model.parameters(), lr=1e-4)
        optimizer.step()
        measured[name] = optimizer_state_bytes(optimizer)
        assert measured[name] == expected_state_bytes(name, model), name
    n = sum(p.numel() for p in model.parameters())
    print(f"{'tiny':7s} {n:12,d} {_mib(measured['adamw']):>14s} {_mib(measured['sgd_sai']):>14s} "
          f"{measured['sgd_sai'] / measured['adamw']:6.3f}  measured after a step (= shape formula)")  # fmt: skip
    for preset in ("0.1B", "1.0B"):
        with torch.device("meta"):
            meta = LaVinDiTTransformer3DModel.from_preset(preset)
        n = sum(p.numel() for p in meta.parameters())
        adamw, sai = expected_state_bytes("adamw", meta), expected_state_bytes("sgd_sai", meta)
        print(f"{preset:7s} {n:12,d} {_mib(adamw):>14s} {_mib(sai):>14s} {sai / adamw:6.3f}  meta device, shapes")

    task = build_task(size=32)
    runs = [("adamw", 1e-3)] + [("sgd_sai", lr) for lr in args.sgd_lrs]
    results = []
    for name, lr in runs:
        model = build_model(seed=0)
        optimizer = build_optimizer(name, model.parameters(), lr=lr, betas=(0.9, 0.99))
        tic = time.perf_counter()
        curve = train(model, task, optimizer, args.steps, eval_every=max(1, args.steps // 4))
        seconds = time.perf_counter() - tic
        results.append((name, lr, curve, seconds, optimizer_state_bytes(optimizer)))
        print(f"  {name:8s} lr {lr:g}: " + ", ".join(f"{s}: {v:.4f}" for s, v in curve) + f"  ({seconds:.1f} s)")
    base = results[0]
    print(f"\nheld-out flow loss after {args.steps} steps (tiny preset, 32 px, batch 8)")
    for name, lr, curve, seconds, state in results:
        print(f"{name:8s} lr {lr:<8g} loss {curve[-1][1]:.4f} (x{curve[-1][1] / base[2][-1][1]:.3f} of AdamW)  "
              f"state {_mib(state)}  {seconds / args.steps * 1e3:.0f} ms/step")  # fmt: skip


if __name__ == "__main__":
    main()
