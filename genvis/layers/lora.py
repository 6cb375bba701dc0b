"""LoRA adapters for the DiTs (LaVin-DiT, MVDiT) through peft, usable from the train scripts' ``lora.*`` options.

The genvis models are plain diffusers ``ModelMixin`` classes (no ``PeftAdapterMixin``), so adapters are injected with
``peft.inject_adapter_in_model`` (the same call diffusers' ``add_adapter`` makes): the targeted ``nn.Linear`` layers
become peft ``LoraLayer`` wrappers, ``B`` starts at zero (the adapted model equals the base model at init) and every
non-adapter parameter is frozen. :func:`merge_lora` returns a plain copy with the adapters folded in, which is what
``save_pretrained`` / the pipelines expect.

:func:`save_lora` writes one folder that each library's own loader reads (docs/pipelines.md, "LoRA adapters"):

- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's layout, keys ``base_model.model.<layer>.lora_A.weight``
  (``peft.PeftModel.from_pretrained(base, folder)``; for a transformers LM also ``model.load_adapter(folder)``);
- ``pytorch_lora_weights.safetensors``: diffusers' layout, keys ``transformer.<layer>.lora_A.weight`` and the
  ``LoraConfig`` in the file's ``lora_adapter_metadata`` (a ``PeftAdapterMixin`` model's
  ``load_lora_adapter(folder, use_safetensors=True)``, and the genvis pipelines' ``load_lora_weights(folder)``).

:func:`load_lora` and :func:`load_lora_weights_into` raise a ``ValueError`` naming the folder and the keys when a file
does not fit the model, instead of loading nothing. Folders genvis wrote before (``adapter_model.safetensors`` keyed
``<layer>.lora_A.weight``, without peft's prefix) are converted on load, with one log line.

Tests: tests/efficiency/test_dit_lora.py, tests/training/test_lora_exports.py.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoRAOptions",
    "add_lora",
    "load_lora",
    "load_lora_weights_into",
    "lora_parameters",
    "merge_lora",
    "save_lora",
    "save_vision_language_lora",
]

# the q/k/v/out projections of every genvis Attention (both DiTs), the common diffusers LoRA default
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name
ADAPTER_CONFIG = "adapter_config.json"  # peft's file name
PEFT_PREFIX = "base_model.model."  # what PeftModel's keys start with (PeftModel -> LoraModel -> the model)
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_PREFIX = "transformer"  # diffusers' default prefix for a pipeline's transformer
EXPLORA_CONFIG = "explora_config.json"  # genvis.training.explora.CONFIG_FILE (that module imports this one)

logger = logging.getLogger(__name__)


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


def save_lora(
    model: nn.Module,
    folder: str | Path,
    config: LoraConfig,
    adapter_name: str = "default",
    diffusers_prefix: str | None = DIFFUSERS_PREFIX,
) -> Path:
    """Write ``model``'s adapter to ``folder`` in peft's and diffusers' layouts (module doc).

    Args:
        model: the adapted model (after :func:`add_lora`).
        folder: output folder (created).
        config: the :class:`peft.LoraConfig` :func:`add_lora` returned.
        adapter_name: the adapter to save.
        diffusers_prefix: key prefix of ``pytorch_lora_weights.safetensors`` (the pipeline component the model is);
            None writes the peft files only (e.g. a transformers LM).

    Raises:
        ValueError: ``model`` has no adapter ``adapter_name``.
    """
    folder = Path(folder)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not state:
        raise ValueError(
            f"save_lora: {type(model).__name__} has no LoRA adapter {adapter_name!r} (call add_lora first)"
        )
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({PEFT_PREFIX + key: value for key, value in tensors.items()}, folder / ADAPTER_WEIGHTS, {"format": "pt"})
    if diffusers_prefix:
        saved_config = json.loads((folder / ADAPTER_CONFIG).read_text())
        metadata = json.dumps({f"{diffusers_prefix}.{key}": value for key, value in saved_config.items()}, indent=2)
        save_file(
            {f"{diffusers_prefix}.{key}": value for key, value in tensors.items()},
            folder / DIFFUSERS_WEIGHTS,
            {"format": "pt", DIFFUSERS_METADATA_KEY: metadata},
        )
    return folder


def _read_peft_folder(folder: Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """``(state keyed <layer>.lora_X.weight, config)`` from peft's files; genvis' old layout converted."""
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise ValueError(
            f"LoRA adapter {folder}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (peft's layout, written by "
            f"genvis.layers.lora.save_lora), missing {missing}; found {found}"
        )
    config = LoraConfig.from_pretrained(str(folder))
    state = load_file(folder / ADAPTER_WEIGHTS)
    prefixed = [key for key in state if key.startswith(PEFT_PREFIX)]
    if prefixed and len(prefixed) == len(state):
        return {key[len(PEFT_PREFIX) :]: value for key, value in state.items()}, config
    if prefixed:
        bare = [key for key in state if not key.startswith(PEFT_PREFIX)]
        raise ValueError(
            f"LoRA adapter {folder / ADAPTER_WEIGHTS}: {len(prefixed)} keys start with {PEFT_PREFIX!r} and "
            f"{len(bare)} do not (e.g. {bare[:3]}); expected one layout"
        )
    logger.info(
        f"LoRA adapter {folder}: genvis' old layout (keys without peft's {PEFT_PREFIX!r} prefix), converted on load; "
        "save it again with genvis.layers.lora.save_lora for peft / diffusers to read it"
    )
    return state, config


def _read_diffusers_file(path: Path, prefix: str | None) -> tuple[dict[str, torch.Tensor], LoraConfig | None]:
    """``(state keyed <layer>.lora_X.weight, config from the file's metadata or None)``."""
    state = load_file(path)
    with safe_open(str(path), "pt") as handle:
        raw = (handle.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
    metadata = json.loads(raw) if raw else None
    if prefix:
        head = f"{prefix}."
        kept = {key[len(head) :]: value for key, value in state.items() if key.startswith(head)}
        if not kept:
            raise ValueError(
                f"LoRA weights {path}: no key starts with {head!r} (the pipeline component to adapt); "
                f"keys are e.g. {sorted(state)[:3]}"
            )
        state = kept
        if metadata is not None:
            metadata = {key[len(head) :]: value for key, value in metadata.items() if key.startswith(head)} or None
    return state, (LoraConfig(**metadata) if metadata else None)


def _infer_config(state: Mapping[str, torch.Tensor]) -> LoraConfig:
    """A config for a state dict without one: the layers it adapts, their ranks, ``alpha = rank`` (diffusers' rule)."""
    ranks = {key.split(".lora_B")[0]: value.shape[1] for key, value in state.items() if ".lora_B" in key}
    if not ranks:
        raise ValueError(f"LoRA state dict has no lora_B weights: keys are e.g. {sorted(state)[:3]}")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{name}$": r for name, r in ranks.items() if r != rank}
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(ranks), rank_pattern=pattern)


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.delete_adapter(adapter_name)


def load_lora_weights_into(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    config: LoraConfig | None = None,
    prefix: str | None = DIFFUSERS_PREFIX,
    weight_name: str | None = None,
) -> LoraConfig:
    """Inject and load a LoRA adapter into ``model`` from any layout genvis, peft or diffusers writes.

    Args:
        model: the base model (any ``nn.Module``; no ``PeftAdapterMixin`` needed).
        source: a folder (``pytorch_lora_weights.safetensors`` read with ``prefix``; else peft's
            ``adapter_model.safetensors``, genvis' old layout included), a ``.safetensors`` file, or a state dict.
        adapter_name: the peft adapter name.
        config: the ``LoraConfig``; default the folder's (``adapter_config.json`` / the file's metadata), else
            inferred from the weights (rank from ``lora_B``, ``alpha = rank``).
        prefix: key prefix of diffusers-layout weights (``transformer``); None for unprefixed keys.
        weight_name: a file in the folder to read instead of the default ones.

    Raises:
        ValueError: nothing readable at ``source``, or weights that do not fit ``model`` (names the source and keys).
    """
    label = "the given state dict" if isinstance(source, Mapping) else str(source)
    file_config: LoraConfig | None = None
    if isinstance(source, Mapping):
        state = dict(source)
        if prefix and any(key.startswith(f"{prefix}.") for key in state):
            state = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
        elif any(key.startswith(PEFT_PREFIX) for key in state):
            state = {k[len(PEFT_PREFIX) :]: v for k, v in state.items() if k.startswith(PEFT_PREFIX)}
    else:
        path = Path(source)
        if (path if path.is_dir() else path.parent).joinpath(EXPLORA_CONFIG).is_file():
            raise ValueError(
                f"LoRA adapter {path}: this folder holds an ExPLoRA run; its adapters alone are not the trained model "
                f"(the unfrozen blocks are in its explora_trainable.safetensors): load it with "
                "genvis.training.explora.load_explora(model, folder)"
            )
        if path.is_dir() and weight_name is not None:
            path = path / weight_name
        if path.is_file():
            if path.name == ADAPTER_WEIGHTS and (path.parent / ADAPTER_CONFIG).is_file():
                state, file_config = _read_peft_folder(path.parent)
            else:
                state, file_config = _read_diffusers_file(path, prefix)
        elif (path / DIFFUSERS_WEIGHTS).is_file():
            state, file_config = _read_diffusers_file(path / DIFFUSERS_WEIGHTS, prefix)
        elif path.is_dir():
            state, file_config = _read_peft_folder(path)
        else:
            raise ValueError(f"LoRA adapter {path}: no such file or folder")
    if not state:
        raise ValueError(f"LoRA adapter {label}: holds no weights")
    config = config or file_config or _infer_config(state)
    _apply(model, state, config, adapter_name, label)
    return config


def _apply(model: nn.Module, state: dict, config: LoraConfig, adapter_name: str, label: str) -> None:
    """Inject ``config`` and load ``state`` (keys ``<layer>.lora_X.weight``); every key must land, or nothing does."""
    name = type(model).__name__
    bad = [key for key in state if ".lora_" not in key]
    if bad:
        raise ValueError(f"LoRA adapter {label}: keys without lora_A / lora_B for {name}, e.g. {bad[:5]}")
    modules = dict(model.named_modules())
    layers = sorted({key.split(".lora_")[0] for key in state})
    absent = [layer for layer in layers if layer not in modules]
    if absent:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"LoRA adapter {label} does not fit {name}: {len(absent)} of its {len(layers)} layers are not in the "
            f"model, e.g. {absent[:5]} (the model's linear layers are e.g. {linear[:5]}); missing keys e.g. "
            f"{[key for key in state if key.split('.lora_')[0] in absent][:5]}"
        )
    if any(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in modules.values()):
        raise ValueError(f"LoRA adapter {label}: {name} already has an adapter named {adapter_name!r}")
    try:
        with warnings.catch_warnings():  # a second adapter is deliberate here (named, checked above)
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as err:
        raise ValueError(
            f"LoRA adapter {label}: target_modules {config.target_modules!r} match no layer of {name}: {err}"
        ) from err
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    except RuntimeError as err:  # shape mismatch
        _remove_adapter(model, adapter_name)
        raise ValueError(f"LoRA adapter {label} does not fit {name}: {str(err).strip()[:500]}") from err
    missing = [key for key in result.missing_keys if "lora_" in key and f".{adapter_name}." in key]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        _remove_adapter(model, adapter_name)
        raise ValueError(
            f"LoRA adapter {label} does not fit {name}: {len(missing)} adapter weights of the model are not in the "
            f"file (e.g. {missing[:5]}), {len(unexpected)} keys of the file match no adapter weight "
            f"(e.g. {unexpected[:5]})"
        )
    if hasattr(model, "_hf_peft_config_loaded"):  # a diffusers PeftAdapterMixin model: keep its bookkeeping
        model._hf_peft_config_loaded = True


def load_lora(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> LoraConfig:
    """Inject the adapter saved by :func:`save_lora` (or by peft's ``save_pretrained``) into a base ``model``.

    Reads peft's ``adapter_config.json`` + ``adapter_model.safetensors``; genvis' old layout (keys without
    ``base_model.model.``) is converted with one log line.

    Raises:
        ValueError: missing files, or adapter keys that do not fit ``model`` (the folder and the keys are named).
    """
    folder = Path(folder)
    state, config = _read_peft_folder(folder)
    _apply(model, state, config, adapter_name, str(folder))
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


def save_vision_language_lora(model: nn.Module, directory: str | Path) -> Path | None:
    """Write a LoRA-enabled ``VisionLanguageModel``'s LM adapter in peft's layout to ``<directory>/lora``.

    ``VisionLanguageModel.save_pretrained(directory)`` keeps its own ``lora/adapter.safetensors`` (what its
    ``from_pretrained`` reads); this adds ``adapter_config.json`` + ``adapter_model.safetensors`` next to it, so
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory / "language_model"), directory / "lora")``
    (or transformers' ``load_adapter``) gives the same LM. Returns the folder, or None when LoRA is off.
    """
    lora = getattr(getattr(model, "config", None), "lora", None)
    if lora is None:
        return None
    config = LoraConfig(**{key: value for key, value in lora.items() if key != "train_projector"})
    return save_lora(model.language_model, Path(directory) / "lora", config, diffusers_prefix=None)
