"""Packed (cu_seqlens) vs padded (key mask) vs dense block-diagonal-mask attention, and a full transformer block.

A mixed-length batch (native-resolution images at patch 16, ~40% padding when padded to the longest) runs through
(1) attention alone and (2) a pre-norm ViT block (attention + GELU MLP), forward + backward, fp32, 2 threads.
Outputs are checked to agree before timing. Prints times and the padded/packed and dense/packed ratios.

    python benchmarks/packed_attention.py [--width 384 --heads 6 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from genvis.layers import GELUMLP, Attention, pack_sequences, pad_packed


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, bias=True)
        self.mlp = GELUMLP(width, 4 * width)

    def forward(self, x, **attn_kwargs):
        x = x + self.attn(self.norm1(x), **attn_kwargs)
        return x + self.mlp(self.norm2(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # 8 images at native resolution 192..384 px, patch 16 -> token grids (~38% padding when padded)
    sizes = [(384, 384), (384, 256), (256, 320), (320, 320), (256, 256), (384, 192), (320, 256), (224, 352)]
    lengths = [(h // 16) * (w // 16) for h, w in sizes]
    padding = 1 - sum(lengths) / (len(lengths) * max(lengths))
    tokens, cu = pack_sequences([torch.randn(n, args.width) for n in lengths])
    padded, mask = pad_packed(tokens, cu)
    dense_mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for n in lengths])[None, None]
    print(
        f"{len(lengths)} sequences, {sum(lengths)} real tokens, padded to {padded.numel() // args.width}: "
        f"{100 * padding:.1f}% padding; width {args.width}, {args.heads} heads, {args.threads} threads"
    )

    block = Block(args.width, args.heads)
    attn = block.attn
    variants = {
        "packed (per-segment SDPA)": (tokens, {"cu_seqlens": cu}),
        "padded + key mask": (padded, {"attn_mask": mask}),
        "packed + dense block mask": (tokens[None], {"attn_mask": dense_mask}),
    }

    # correctness first: all three agree on the real tokens
    with torch.no_grad():
        ref = block(tokens, cu_seqlens=cu)
        torch.testing.assert_close(block(padded, attn_mask=mask)[mask], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(block(tokens[None], attn_mask=dense_mask)[0], ref, atol=1e-4, rtol=1e-4)

    steps = {}
    for scope, module in (("attention", attn), ("block", block)):
        for name, (x, kwargs) in variants.items():
            x = x.clone().requires_grad_(True)

            def step(module=module, x=x, kwargs=kwargs):
                module.zero_grad(set_to_none=True)
                module(x, **kwargs).square().mean().backward()

            steps[scope, name] = step
    # round-robin best-of-k so a burst of load on the machine hits every variant alike
    results = {key: float("inf") for key in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            results[key] = min(results[key], time.perf_counter() - start)

    base = "packed (per-segment SDPA)"
    for scope in ("attention", "block"):
        print(f"\n{scope} fwd+bwd:")
        for name in variants:
            t = results[scope, name]
            print(f"  {name:28s} {1000 * t:8.1f} ms   {results[scope, name] / results[scope, base]:5.2f}x packed time")
    ratio = results["block", "padded + key mask"] / results["block", base]
    print(
        f"\nRESULT full block: packed is {ratio:.2f}x faster than padded "
        f"({results['block', 'packed + dense block mask'] / results['block', base]:.2f}x vs dense block mask)"
    )


if __name__ == "__main__":
    main()
