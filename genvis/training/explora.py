"""ExPLoRA extended pre-training through peft, for the shared ViT encoder and the DiTs (any ``nn.Module``).

ExPLoRA (Khanna et al., arXiv 2406.10973) continues the pre-training of a frozen foundation model on a new domain by
training a small part of it: a few named blocks are unfrozen completely, every other block gets LoRA adapters on its
attention projections (the paper: Q and V), and all normalisation layers are unfrozen. :func:`explora` applies that
recipe in place; it reuses the peft injection of :mod:`genvis.layers.lora`, so the adapted model starts equal to the
base model, and :func:`genvis.layers.lora.merge_lora` folds the adapters back into plain weights for
``save_pretrained``.

Blocks are addressed by index into the model's block list (``blocks`` for the ViT and MVDiT, ``transformer_blocks``
for LaVin-DiT; negative indices count from the end) or by full module name. :func:`save_explora` writes the adapters in
peft's format plus ``explora_trainable.safetensors`` (the unfrozen blocks' and norms' weights) and
``explora_config.json``; :func:`load_explora` re-applies them to a fresh base model.

Tests: tests/efficiency/test_explora.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from genvis.layers import RMSNorm
from genvis.layers.lora import add_lora, load_lora, save_lora

__all__ = ["ExploraConfig", "explora", "explora_parameters", "load_explora", "save_explora"]

BLOCK_LIST_NAMES: tuple[str, ...] = ("blocks", "transformer_blocks")
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, RMSNorm)
TRAINABLE_FILE = "explora_trainable.safetensors"
CONFIG_FILE = "explora_config.json"


@dataclass
class ExploraConfig:
    """What :func:`explora` unfroze and adapted (resolved names, so it re-applies exactly).

    Args:
        unfrozen_modules: fully trainable module names.
        lora_modules: full names of the linear layers carrying LoRA.
        norm_parameters: parameter names of the unfrozen norms.
        extra_trainable: further trainable parameter names or prefixes.
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
    """

    unfrozen_modules: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    norm_parameters: list[str] = field(default_factory=list)
    extra_trainable: list[str] = field(default_factory=list)
    lora_rank: int = 8
    lora_alpha: float | None = None


def _block_list(model: nn.Module, blocks_attr: str | None) -> tuple[str, nn.ModuleList]:
    names = (blocks_attr,) if blocks_attr else BLOCK_LIST_NAMES
    for name in names:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return name, blocks
    raise ValueError(f"{type(model).__name__} has no block list named {names}; pass blocks_attr or module names")


def explora(
    model: nn.Module,
    unfreeze_blocks: Sequence[int | str] = (-1,),
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] = ("to_q", "to_v"),
    unfreeze_norms: bool = True,
    extra_trainable: Sequence[str] = (),
    blocks_attr: str | None = None,
) -> ExploraConfig:
    """Apply the ExPLoRA recipe in place: unfreeze blocks fully, LoRA elsewhere, unfreeze norms.

    Args:
        model: the encoder or a DiT.
        unfreeze_blocks: block indices (negative from the end) or full module names trained completely.
        lora_rank: LoRA rank of the adapters on the other blocks.
        lora_alpha: LoRA alpha (None: ``lora_rank``).
        target_modules: name suffixes of the linear layers adapted outside the unfrozen blocks.
        unfreeze_norms: train every LayerNorm / GroupNorm / RMSNorm weight and bias.
        extra_trainable: further parameter names (or name prefixes) to train, e.g. ``"register_tokens"``.
        blocks_attr: name of the block ``nn.ModuleList`` (default: ``blocks`` or ``transformer_blocks``).

    Returns:
        The resolved :class:`ExploraConfig` (pass it to :func:`save_explora`).

    Raises:
        ValueError: an index outside the block list, an unknown module name, or no layer matching
            ``target_modules`` outside the unfrozen blocks.
    """
    unfrozen = []
    for entry in unfreeze_blocks:
        if isinstance(entry, int):
            list_name, blocks = _block_list(model, blocks_attr)
            if not -len(blocks) <= entry < len(blocks):
                raise ValueError(f"unfreeze_blocks: index {entry} is outside [-{len(blocks)}, {len(blocks)})")
            unfrozen.append(f"{list_name}.{entry % len(blocks)}")
        else:
            try:
                model.get_submodule(entry)
            except AttributeError as err:
                raise ValueError(f"unfreeze_blocks: {type(model).__name__} has no module {entry!r}") from err
            unfrozen.append(entry)
    suffixes = tuple(target_modules)
    lora_modules = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == s or name.endswith("." + s) for s in suffixes)
        and not any(name == u or name.startswith(u + ".") for u in unfrozen)
    ]
    if not lora_modules:
        raise ValueError(f"target_modules {list(suffixes)} match no nn.Linear outside the unfrozen blocks {unfrozen}")
    norm_parameters = [
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if unfreeze_norms and isinstance(module, NORM_TYPES)
        for param_name, _ in module.named_parameters(recurse=False)
    ]
    config = ExploraConfig(unfrozen, lora_modules, norm_parameters, list(extra_trainable), lora_rank, lora_alpha)
    add_lora(model, rank=lora_rank, alpha=lora_alpha, target_modules=lora_modules)
    _set_trainable(model, config)
    return config


def _set_trainable(model: nn.Module, config: ExploraConfig) -> None:
    norms = set(config.norm_parameters)
    unfrozen = tuple(u + "." for u in config.unfrozen_modules)
    matched: set[str] = set()
    for name, param in model.named_parameters():
        hits = {e for e in config.extra_trainable if name == e or name.startswith(e + ".")}
        matched |= hits
        param.requires_grad_("lora_" in name or name in norms or name.startswith(unfrozen) or bool(hits))
    missing = set(config.extra_trainable) - matched
    if missing:
        raise ValueError(f"extra_trainable: {type(model).__name__} has no parameter named {sorted(missing)}")


def explora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters after :func:`explora` (what the optimizer should see)."""
    return [p for p in model.parameters() if p.requires_grad]


def save_explora(model: nn.Module, folder: str | Path, config: ExploraConfig) -> Path:
    """Write the LoRA adapters (peft format), the other trainable weights and the recipe to ``folder``."""
    folder = Path(folder)
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        target_modules=config.lora_modules,
    )
    save_lora(model, folder, lora_config)
    trainable = {
        name: param.detach().contiguous().cpu()
        for name, param in model.named_parameters()
        if param.requires_grad and "lora_" not in name
    }
    save_file(trainable, folder / TRAINABLE_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))
    return folder


def load_explora(model: nn.Module, folder: str | Path) -> ExploraConfig:
    """Re-apply a saved ExPLoRA run to a fresh base ``model`` (adapters, unfrozen weights, trainable flags).

    Raises:
        ValueError: missing files, or saved weights that do not fit ``model``.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / TRAINABLE_FILE).is_file():
        raise ValueError(f"{folder}: expected {CONFIG_FILE} and {TRAINABLE_FILE} (written by save_explora)")
    config = ExploraConfig(**json.loads((folder / CONFIG_FILE).read_text()))
    load_lora(model, folder)
    state = load_file(folder / TRAINABLE_FILE)
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params or params[k].shape != state[k].shape]
    if unknown:
        raise ValueError(f"{folder}: saved weights do not fit {type(model).__name__}: {unknown[:5]}")
    for name, tensor in state.items():
        params[name].data.copy_(tensor)
    _set_trainable(model, config)
    return config
