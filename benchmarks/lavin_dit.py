"""LaVin-DiT J-DiT training step vs diffusers' SD3 MM-DiT of equal width, depth and tokens; achieved FLOP/s vs matmul.

    .venv/bin/python benchmarks/lavin_dit.py [--width 384 --heads 8 --kv-heads 4 --layers 4 --pairs 2 --size 16]
                                             [--batch 2 --repeats 3 --threads 2 --dtype fp32]

Peer: ``diffusers.SD3Transformer2DModel`` (MM-DiT: two streams with separate weights and one joint attention, the
closest published relative of the J-DiT). Both get the same width (heads x head_dim), depth and token counts: the
J-DiT's condition stream (``2 * pairs + 1`` latent frames) is SD3's ``encoder_hidden_states`` (projected
``joint_attention_dim = width -> width``), its target frame is SD3's latent image (16 channels, patch 2). One training
step = forward + MSE backward + AdamW step, fp32 (or bf16 autocast), timed best-of-``--repeats`` in turns (round robin)
so machine load hits both alike; the ratio is J-DiT time / SD3 time from the same run.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward+backward (matmuls, convs and SDPA,
backward included; elementwise ops are not counted). Achieved FLOP/s = counted FLOPs / step time, reported as a
fraction of this machine's measured dense matmul FLOP/s (best of square ``--matmul-size`` matmuls, same dtype and
thread count), the same "MFU against a measured ceiling" used across BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from encoder_packing import round_robin_best  # benchmarks/ is on sys.path when run as a script
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def matmul_flops_per_s(size: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="latent side (16 = a 128 px image through the ST-VAE)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from diffusers import SD3Transformer2DModel

    from genvis.models import LaVinDiTTransformer3DModel

    head_dim = args.width // args.heads
    channels, batch, frames = 16, args.batch, 2 * args.pairs + 1
    tokens_per_frame = (args.size // 2) ** 2
    jdit = LaVinDiTTransformer3DModel(
        in_channels=channels, num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
        attention_head_dim=head_dim,
    )  # fmt: skip
    sd3 = SD3Transformer2DModel(
        sample_size=args.size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=args.layers,
        attention_head_dim=head_dim, num_attention_heads=args.heads, joint_attention_dim=args.width,
        caption_projection_dim=args.width, pooled_projection_dim=args.width, pos_embed_max_size=args.size,
    )  # fmt: skip
    # give the zero-initialised gates values so both models do their full work in backward
    for model in (jdit, sd3):
        with torch.no_grad():
            for param in model.parameters():
                if param.abs().sum() == 0:
                    param.normal_(0, 0.02)

    target = torch.randn(batch, channels, 1, args.size, args.size)
    context = torch.randn(batch, channels, frames, args.size, args.size)
    t = torch.rand(batch)
    text_tokens = torch.randn(batch, frames * tokens_per_frame, args.width)  # SD3's condition stream, same length
    pooled = torch.randn(batch, args.width)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def jdit_loss():
        with autocast:
            return jdit(target, context, t).sample.float().square().mean()

    def sd3_loss():
        with autocast:
            out = sd3(target[:, :, 0], encoder_hidden_states=text_tokens, pooled_projections=pooled,
                      timestep=t * 1000).sample  # fmt: skip
            return out.float().square().mean()

    optimizers = {"jdit": torch.optim.AdamW(jdit.parameters(), 1e-4), "sd3": torch.optim.AdamW(sd3.parameters(), 1e-4)}

    def step(name, loss_fn):
        def run():
            loss = loss_fn()
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    flops = {}
    for name, loss_fn in (("jdit", jdit_loss), ("sd3", sd3_loss)):
        counter = FlopCounterMode(display=False)
        with counter:
            loss_fn().backward()
        flops[name] = counter.get_total_flops()
        optimizers[name].zero_grad(set_to_none=True)

    best = round_robin_best({"jdit": step("jdit", jdit_loss), "sd3": step("sd3", sd3_loss)}, args.repeats)
    peak = matmul_flops_per_s(args.matmul_size, torch.bfloat16 if args.dtype == "bf16" else torch.float32)

    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in (("jdit", jdit), ("sd3", sd3))}
    total_tokens = batch * (frames + 1) * tokens_per_frame
    print(f"width {args.width} ({args.heads} heads x {head_dim}, J-DiT KV heads {args.kv_heads}), depth {args.layers}, "
          f"batch {batch} x ({frames} condition + 1 target frames) x {tokens_per_frame} tokens = {total_tokens} tokens, "
          f"{args.dtype}, {args.threads} threads")  # fmt: skip
    print(f"measured dense matmul ({args.matmul_size}^2, {args.dtype}): {peak / 1e9:.1f} GFLOP/s")
    print("| model | params (M) | train step (ms) | GFLOP / step (fwd+bwd) | achieved GFLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|")
    for name, label in (("jdit", "genvis LaVin-DiT J-DiT"), ("sd3", "diffusers SD3Transformer2DModel")):
        achieved = flops[name] / best[name]
        print(f"| {label} | {params[name]:.2f} | {best[name] * 1e3:.0f} | {flops[name] / 1e9:.1f} | "
              f"{achieved / 1e9:.1f} | {achieved / peak:.0%} |")  # fmt: skip
    print(f"step-time ratio J-DiT / SD3 (same run): {best['jdit'] / best['sd3']:.2f}x; "
          f"tokens/s J-DiT {total_tokens / best['jdit']:.0f}, SD3 {total_tokens / best['sd3']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
