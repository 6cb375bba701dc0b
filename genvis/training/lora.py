"""LoRA adapters for the DiTs (LaVin-DiT, MVDiT) through peft, usable from the train scripts' ``lora.*`` options.

The genvis models are plain diffusers ``ModelMixin`` classes (no ``PeftAdapterMixin``), so adapters are injected with
``peft.inject_adapter_in_model`` (the same call diffusers' ``add_adapter`` makes): the targeted ``nn.Linear`` layers
become peft ``LoraLayer`` wrappers, ``B`` starts at zero (the adapted model equals the base model at init) and every
non-adapter parameter is frozen. Adapters are saved in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``), and :func:`merge_lora` returns a plain copy with the adapters folded in, which is what
``save_pretrained`` / the pipelines expect.

Tests: tests/efficiency/test_dit_lora.py.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoRAOptions",
    "add_lora",
    "load_lora",
    "lora_parameters",
    "merge_lora",
    "save_lora",
]

# the q/k/v/out projections of every genvis Attention (both DiTs), the common diffusers LoRA default
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoRAOptions:
    """The ``lora`` section of the DiT train scripts.

    Args:
        enabled: train LoRA adapters only (the base DiT is frozen).
        rank: LoRA rank.
        alpha: LoRA alpha (None: ``rank``).
        target_modules: module-name suffixes to adapt.
        base_model: ``save_pretrained`` folder of the base transformer (e.g. ``runs/lavin_dit/pipeline/transformer``);
            None keeps the preset's random init (only useful for tests).
    """

    enabled: bool = False
    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    base_model: str | None = None


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] | str = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> LoraConfig:
    """Inject LoRA adapters into ``model`` in place and freeze everything else.

    Args:
        model: a DiT (any ``nn.Module``).
        rank: LoRA rank ``r``.
        alpha: scaling numerator (``alpha / r``); default ``rank`` (scale 1).
        target_modules: module-name suffixes (``to_q``, ``w1``, ...) or a regex string, as peft takes them.
        dropout: LoRA dropout.
        adapter_name: peft adapter name.

    Returns:
        the :class:`peft.LoraConfig` used (save it with :func:`save_lora`).

    Raises:
        ValueError: bad rank, or no module of ``model`` matches ``target_modules``.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora.rank: expected a positive int, got {rank!r}")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("lora.target_modules: expected at least one module name")
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets, lora_dropout=dropout
    )
    try:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as err:
        raise ValueError(f"lora.target_modules: {targets!r} match no layer of {type(model).__name__}: {err}") from err
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return config


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should see)."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def save_lora(model: nn.Module, folder: str | Path, config: LoraConfig, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (peft format) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / ADAPTER_WEIGHTS)
    config.save_pretrained(str(folder))
    return folder


def load_lora(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> LoraConfig:
    """Inject the adapters saved by :func:`save_lora` into a base ``model`` and load their weights.

    Raises:
        ValueError: missing files, or adapter keys that do not fit ``model``.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder}: expected adapter_config.json and {ADAPTER_WEIGHTS} (written by save_lora)")
    config = LoraConfig.from_pretrained(str(folder))
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, load_file(folder / ADAPTER_WEIGHTS), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder}: adapter does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return config


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LoRA layer merged into its base layer and unwrapped (``model`` is unchanged).

    The copy has the original module names and state-dict keys, so ``save_pretrained`` / ``from_pretrained`` of the
    model class work on it.
    """
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged
