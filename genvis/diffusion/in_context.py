"""In-context latents for LaVin-DiT: encode clips independently with a VAE and lay out the condition stream.

Shared by the pipeline (inference) and ``train/lavin_dit.py`` (training), so both see identical latents:
``condition = [in_1, tgt_1, ..., in_N, tgt_N, query]`` along the latent time axis, each clip encoded on its own
(spec §1.2) and normalised ``(z - shift) * scale`` from the VAE config (spec §1.7). Works with the ST-VAE
(``AutoencoderKLCogVideoX`` family) and ``genvis.models.PixelUnshuffleAutoencoder``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["InContextLatents", "decode_clips", "encode_clips", "encode_episodes", "vae_compression"]


def vae_compression(vae) -> tuple[int, int]:
    """``(temporal, spatial)`` compression of an ST-VAE / ``AutoencoderKLCogVideoX`` or a pixel-unshuffle autoencoder."""
    config = vae.config
    temporal = int(getattr(config, "temporal_compression_ratio", 1) or 1)
    spatial = getattr(config, "spatial_compression_ratio", None)
    if spatial is None:
        spatial = 2 ** (len(config.block_out_channels) - 1)
    return temporal, int(spatial)


def _normalization(vae) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None)
    return (0.0 if shift is None else float(shift)), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_clips(
    vae, clips: Sequence[torch.Tensor], generator: torch.Generator | None = None, sample_posterior: bool = True
) -> list[torch.Tensor]:
    """Encode each ``(3, T, H, W)`` clip in [-1, 1] independently -> normalised latents ``(C, t, h, w)``.

    Clips of equal shape are encoded as one batch (the VAE treats batch entries independently).

    Args:
        vae: the autoencoder.
        clips: clips (``T = 1`` for images).
        generator: RNG of the posterior samples.
        sample_posterior: posterior sample (official) instead of its mean.
    """
    shift, scale = _normalization(vae)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, clip in enumerate(clips):
        if clip.ndim != 4 or clip.shape[0] != 3:
            raise ValueError(f"clips[{index}] must be (3, T, H, W), got {tuple(clip.shape)}")
        groups[tuple(clip.shape)].append(index)
    device = next(iter(vae.buffers()), next(iter(vae.parameters()), None))
    device = device.device if device is not None else torch.device("cpu")
    out: list[torch.Tensor | None] = [None] * len(clips)
    for indices in groups.values():
        batch = torch.stack([clips[i] for i in indices]).to(device=device, dtype=vae.dtype)
        dist = vae.encode(batch).latent_dist
        latents = dist.sample(generator=generator) if sample_posterior else dist.mode()
        latents = ((latents - shift) * scale).float()
        for i, z in zip(indices, latents):
            out[i] = z
    return out  # type: ignore[return-value]


@torch.no_grad()
def decode_clips(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(B, C, t, h, w)`` -> pixels ``(B, 3, T, H, W)`` clamped to [-1, 1], fp32."""
    shift, scale = _normalization(vae)
    return vae.decode((latents / scale + shift).to(vae.dtype)).sample.float().clamp(-1, 1)


@dataclass
class InContextLatents:
    """Latents of a batch of episodes (lists: episodes may differ in pairs, frames and size).

    Args:
        targets: ``(C, t_x, h, w)`` clean target latents.
        contexts: ``(C, t_c, h, w)`` condition streams ``[in_1, tgt_1, ..., query]``.
        query_frames: latent frames of each query (the tail of its condition stream).
    """

    targets: list[torch.Tensor]
    contexts: list[torch.Tensor]
    query_frames: list[int]


def encode_episodes(
    vae, episodes: Sequence, generator: torch.Generator | None = None, sample_posterior: bool = True
) -> InContextLatents:
    """Encode ``genvis.tasks.Episode``-like objects (``context_pairs``, ``query``, ``query_target``)."""
    clips, spans = [], []
    for episode in episodes:
        start = len(clips)
        clips.extend(clip for pair in episode.context_pairs for clip in pair)
        clips.extend([episode.query, episode.query_target])
        spans.append((start, len(clips)))
    latents = encode_clips(vae, clips, generator, sample_posterior)
    targets, contexts, query_frames = [], [], []
    for start, end in spans:
        sample = latents[start:end]
        targets.append(sample[-1])
        contexts.append(torch.cat(sample[:-1], dim=1))  # pairs then query along latent time
        query_frames.append(sample[-2].shape[1])
    return InContextLatents(targets, contexts, query_frames)
