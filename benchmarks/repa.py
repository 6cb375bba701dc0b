"""REPA alignment on the tiny LaVin-DiT preset: held-out flow loss with vs without, same run, same seeds.

Both runs start from the same initial J-DiT (tiny preset, 32 px pixel-space episodes of 4 built-in tasks), see the
same batches, times and noise (per-sample seeded), AdamW lr 1e-3. The REPA run adds ``weight * -cos`` between a
projector of block ``--layer``'s target-stream tokens and a frozen encoder's patch features of the clean query target.
No pretrained encoder can be downloaded here, so the encoder is the toy one of ``genvis.training.repa.fit_toy_encoder``
(the tiny ViT preset, patch 4, trained by masked-patch reconstruction on built-in images + procedural scenes, fit in
this run and timed). Reported: held-out flow loss (REPA term excluded) along training, and the steps the REPA run needs
to reach the baseline's final loss. One intra-op thread (the machine is shared).

    python benchmarks/repa.py [--steps 400 --layer 0 --weight 0.5 --save-encoder runs/repa_toy_encoder]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lavin_task import build_model, build_task, steps_to_reach, train

from genvis.training.repa import RepresentationAlignment, fit_toy_encoder, toy_encoder_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--encoder-steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--save-encoder", type=str, default=None, help="save_pretrained folder for repa.encoder")
    args = parser.parse_args()
    torch.set_num_threads(1)

    task = build_task(size=32)
    tic = time.perf_counter()
    encoder = fit_toy_encoder(toy_encoder_images(32), steps=args.encoder_steps, seed=0)
    encoder_s = time.perf_counter() - tic
    if args.save_encoder:
        encoder.save_pretrained(args.save_encoder)
    print(f"toy encoder fit: {args.encoder_steps} steps in {encoder_s:.1f} s")

    curves, times = {}, {}
    for name in ("baseline", "repa"):
        model = build_model(seed=0)
        repa = (
            RepresentationAlignment(encoder, model, layer=args.layer, weight=args.weight) if name == "repa" else None
        )
        params = [*model.parameters(), *(repa.projector.parameters() if repa else [])]
        optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
        tic = time.perf_counter()
        curves[name] = train(model, task, optimizer, args.steps, eval_every=args.eval_every, repa=repa, params=params,
                             on_eval=lambda s, v, n=name: print(f"  {n:8s} step {s:4d}: held-out loss {v:.4f}"))  # fmt: skip
        times[name] = time.perf_counter() - tic

    base_final = curves["baseline"][-1][1]
    repa_final = curves["repa"][-1][1]
    reach = steps_to_reach(curves["repa"], base_final)
    print("\nstep  baseline  repa")
    for (step, b), (_, r) in zip(curves["baseline"], curves["repa"]):
        print(f"{step:4d}  {b:.4f}  {r:.4f}")
    print(f"\nfinal held-out loss at {args.steps} steps: baseline {base_final:.4f}, REPA {repa_final:.4f} "
          f"(ratio {repa_final / base_final:.3f})")  # fmt: skip
    speedup = f"{args.steps / reach:.2f}x fewer steps" if reach else "not reached"
    print(f"REPA reaches the baseline's final loss at step {reach} ({speedup})")
    print(f"wall time: baseline {times['baseline']:.1f} s, REPA {times['repa']:.1f} s "
          f"(+{100 * (times['repa'] / times['baseline'] - 1):.0f}% per step) + encoder fit {encoder_s:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
