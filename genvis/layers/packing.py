"""Pack variable-length token sequences into one ``(T, ...)`` tensor with ``cu_seqlens``, and back."""

from __future__ import annotations

import itertools

import torch

from genvis.layers.attention import cu_seqlens_from_lengths

__all__ = ["pack_sequences", "pad_packed", "unpack_sequences"]


def pack_sequences(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``[(L_i, ...)]`` into ``(sum L_i, ...)``; returns (packed, cu_seqlens)."""
    if not sequences:
        raise ValueError("pack_sequences needs at least one sequence")
    tail = sequences[0].shape[1:]
    for i, seq in enumerate(sequences):
        if seq.shape[1:] != tail or seq.shape[0] == 0:
            raise ValueError(f"sequence {i} has shape {tuple(seq.shape)}; expected (L>0, {', '.join(map(str, tail))})")
    cu_seqlens = cu_seqlens_from_lengths([s.shape[0] for s in sequences], device=sequences[0].device)
    return torch.cat(sequences, dim=0), cu_seqlens


def unpack_sequences(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    bounds = cu_seqlens.tolist()
    return [packed[s:e] for s, e in itertools.pairwise(bounds)]


def pad_packed(packed: torch.Tensor, cu_seqlens: torch.Tensor, pad_value: float = 0.0):
    """``(T, ...)`` packed -> ``(N, L_max, ...)`` padded and a ``(N, L_max)`` bool mask (True = real token)."""
    sequences = unpack_sequences(packed, cu_seqlens)
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_value)
    lengths = torch.tensor([s.shape[0] for s in sequences], device=packed.device)
    mask = torch.arange(padded.shape[1], device=packed.device)[None] < lengths[:, None]
    return padded, mask
