"""Token compression on the shared ViT: images/s gain vs FLOP cut vs feature fidelity, against the same ViT uncompressed.

    .venv/bin/python benchmarks/token_compression.py [--layers 12] [--image-size 224] [--batch 8] [--repeats 3]

One ViT-S-shaped encoder (width 384, 6 heads, MLP 1536, patch 16, CLS, learned positions; random init: no weights can
be downloaded here) encodes real photographs shipped in scikit-image (genvis.data.builtin). Measured side by side in
one process, fp32 forward, best of ``--repeats`` after a warm-up, round robin:

- ``none``: the encoder without compression (the peer);
- ``tome r=K``: parameter-free ToMe merging ``K`` tokens per block, proportional attention;
- ``diffrate F``: DiffRate prune + merge rates searched off the shelf (encoder frozen, ``--search-steps`` steps of
  distillation to the uncompressed encoder + FLOP penalty) for a target of ``F`` x the block MACs;
- ``expedit S``: Expedit hourglass, patch grid clustered to ``S`` x its side after block ``--expedit-location``,
  reconstructed after the last block (parameter-free).

Per row: images/s, speed-up over ``none``, block MACs (DiffRate convention) as a fraction of ``none``, the ratio
speed-up / FLOP reduction (A8 expects 0.8-0.9 on GPUs), and feature fidelity: mean cosine of the pooled (CLS) output
and of the un-merged patch tokens to ``none``. One intra-op thread (``--threads``): the machine is shared and small
matmuls with 2 threads are erratic under load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from encoder_packing import round_robin_best  # benchmarks/ is the script's directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tome-r", type=int, nargs="*", default=[8, 13])
    parser.add_argument("--diffrate-targets", type=float, nargs="*", default=[0.7, 0.5])
    parser.add_argument("--expedit-scales", type=float, nargs="*", default=[0.7, 0.5])
    parser.add_argument("--expedit-location", type=int, default=None, help="default: num_layers // 3")
    parser.add_argument("--expedit-tau", type=float, default=0.02)
    parser.add_argument("--search-steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from genvis.data.builtin import builtin_images
    from genvis.encoders import VisionTransformerModel
    from genvis.encoders.token_compression import (
        DiffRateCompressor,
        ExpeditCompressor,
        ToMeCompressor,
        encoder_flops,
        search_diffrate,
    )

    patch = 16
    grid = args.image_size // patch
    model = VisionTransformerModel(
        patch_size=patch,
        num_layers=args.layers,
        num_attention_heads=6,
        attention_head_dim=64,
        mlp_hidden_dim=1536,
        position_embedding_type="learned",
        pos_embed_grid_size=[grid, grid],
        pos_embed_cls=True,
    ).eval()
    photos = [image for _, image in builtin_images(args.image_size)]
    pixels = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1
    images = pixels[: args.batch]
    search_images = [pixels[args.batch : args.batch + 4], pixels[args.batch + 4 : args.batch + 8]]
    num_patches = grid * grid
    full = float(encoder_flops(model, num_patches))

    compressors: dict[str, torch.nn.Module | None] = {"none": None}
    for r in args.tome_r:
        compressors[f"tome r={r}"] = ToMeCompressor(r)
    for target in args.diffrate_targets:
        compressor = DiffRateCompressor(args.layers, num_patches, granularity=4)
        start = time.perf_counter()
        logs = search_diffrate(model, compressor, search_images, target, steps=args.search_steps, lr=0.05)
        print(
            f"diffrate search target {target}: {time.perf_counter() - start:.1f} s, "
            f"final loss {logs[-1]['loss']:.4f}, flops ratio {logs[-1]['flops_ratio']:.3f}"
        )
        compressors[f"diffrate {target}"] = compressor
    location = args.layers // 3 if args.expedit_location is None else args.expedit_location
    for scale in args.expedit_scales:
        compressors[f"expedit {scale}"] = ExpeditCompressor(
            location, grid_scale=scale, tau=args.expedit_tau, reconstruction_tau=args.expedit_tau
        )

    outputs, kept, macs = {}, {}, {}
    with torch.inference_mode():
        for name, compressor in compressors.items():
            model.set_token_compression(compressor)
            outputs[name] = model(images)
            kept[name] = None if compressor is None else list(compressor.last_kept)
            macs[name] = full if compressor is None else compressor.macs(model, num_patches)

        def runner(compressor):
            def run():
                model.set_token_compression(compressor)
                model(images)

            return run

        best = round_robin_best({name: runner(c) for name, c in compressors.items()}, args.repeats)
    model.set_token_compression(None)

    print(
        f"ViT-S width, {args.layers} blocks, {args.image_size} px ({num_patches} patches + CLS), batch {args.batch}, "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    header = (
        f"{'mode':<16}{'img/s':>9}{'speed-up':>10}{'MACs':>8}{'gain/cut':>10}{'cos CLS':>9}{'cos patch':>11}  kept"
    )
    print(header)
    reference = outputs["none"]
    for name in compressors:
        seconds = best[name]
        flops = macs[name]
        speedup = best["none"] / seconds
        cut = full / flops
        cos_cls = F.cosine_similarity(outputs[name].pooler_output, reference.pooler_output).mean().item()
        cos_patch = F.cosine_similarity(outputs[name].patch_tokens, reference.patch_tokens).mean().item()
        print(
            f"{name:<16}{args.batch / seconds:>9.2f}{speedup:>9.2f}x{flops / full:>8.2f}{speedup / cut:>10.2f}"
            f"{cos_cls:>9.3f}{cos_patch:>11.3f}  {kept[name] or '-'}"
        )


if __name__ == "__main__":
    main()
