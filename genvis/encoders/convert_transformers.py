"""Import ``transformers`` vision checkpoints into :class:`genvis.encoders.VisionTransformerModel`.

Supported (``config.json`` ``model_type``; composite configs use their ``vision_config``):

| source class | model_type |
|---|---|
| ``ViTModel`` | ``vit`` |
| ``CLIPVisionModel`` / ``CLIPModel`` | ``clip_vision_model`` / ``clip`` |
| ``Siglip2VisionModel`` / ``Siglip2Model`` (NaFlex) | ``siglip2_vision_model`` / ``siglip2`` |
| ``Dinov2WithRegistersModel`` | ``dinov2_with_registers`` |
| Qwen2-VL vision tower / full model | ``qwen2_vl_vision`` / ``qwen2_vl`` |
| Qwen2.5-VL vision tower / full model | ``qwen2_5_vl_vision`` / ``qwen2_5_vl`` |

Weights are read by their on-disk names (what ``save_pretrained`` and hub files use), with or without a prefix such as
``vision_model.``, ``visual.``, ``model.visual.``, ``vit.``; keys of other sub-models in the same file (text towers,
projections, the LLM) are ignored. Every source key under the chosen prefix must be used and every genvis parameter
filled with the right shape, otherwise a ``ValueError`` names the keys. Conformance (fp32, max |diff| <= 1e-5 against
random-init references saved with ``save_pretrained``): tests/encoders/test_convert_transformers.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from genvis.encoders.vit import VisionTransformerModel

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "convert_transformers_state_dict",
    "genvis_config_from_transformers",
    "load_transformers_vision_model",
]

# Prefixes tried, longest first, when the keys do not match a bare vision model.
_PREFIXES = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.visual.",
    "vision_model.",
    "vision_tower.",
    "visual.",
    "dinov2_with_registers.",
    "vit.",
    "model.",
)

_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


def _activation(name: str, model_type: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"{model_type}: hidden_act {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _heads(hidden: int, heads: int, model_type: str) -> int:
    if hidden % heads:
        raise ValueError(f"{model_type}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return hidden // heads


def _common_vit(cfg: dict, model_type: str) -> dict:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    grid = cfg["image_size"] // cfg["patch_size"]
    return {
        "in_channels": cfg.get("num_channels", 3),
        "patch_size": cfg["patch_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "attention_head_dim": _heads(hidden, heads, model_type),
        "mlp_type": _activation(cfg.get("hidden_act", "gelu"), model_type),
        "norm_eps": cfg.get("layer_norm_eps", 1e-12),
        "position_embedding_type": "learned",
        "pos_embed_grid_size": [grid, grid],
        "pos_embed_cls": True,
        "pos_embed_interpolation": "bicubic",
        "use_cls_token": True,
    }


def _config_vit(cfg: dict, keys: set[str]) -> dict:
    return {
        **_common_vit(cfg, "vit"),
        "mlp_hidden_dim": cfg["intermediate_size"],
        "qkv_bias": cfg.get("qkv_bias", True),
        "pooling_type": "cls_dense_tanh" if "pooler.dense.weight" in keys else "cls",
    }


def _config_clip(cfg: dict, keys: set[str]) -> dict:
    return {
        **_common_vit(cfg, "clip"),
        "mlp_hidden_dim": cfg["intermediate_size"],
        "norm_eps": cfg.get("layer_norm_eps", 1e-5),
        "patch_bias": False,
        "pre_norm": True,
        "final_norm": "pooled",
    }


def _config_dinov2_registers(cfg: dict, keys: set[str]) -> dict:
    hidden = cfg["hidden_size"]
    swiglu = cfg.get("use_swiglu_ffn", False)
    mlp_hidden = int(hidden * cfg.get("mlp_ratio", 4))
    if swiglu:  # DINOv2's SwiGLU width: 2/3 of the GELU width, rounded up to a multiple of 8
        mlp_hidden = (int(mlp_hidden * 2 / 3) + 7) // 8 * 8
    return {
        **_common_vit(cfg, "dinov2_with_registers"),
        "mlp_type": "swiglu" if swiglu else _activation(cfg.get("hidden_act", "gelu"), "dinov2_with_registers"),
        "mlp_hidden_dim": mlp_hidden,
        "norm_eps": cfg.get("layer_norm_eps", 1e-6),
        "qkv_bias": cfg.get("qkv_bias", True),
        "layer_scale_init_value": cfg.get("layerscale_value", 1.0),
        "pos_embed_antialias": True,
        "num_register_tokens": cfg.get("num_register_tokens", 4),
        "use_mask_token": True,
    }


def _config_siglip2(cfg: dict, keys: set[str]) -> dict:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    side = round(cfg["num_patches"] ** 0.5)
    if side * side != cfg["num_patches"]:
        raise ValueError(f"siglip2: num_patches {cfg['num_patches']} is not a square grid")
    use_head = cfg.get("vision_use_head", True)
    return {
        "in_channels": cfg.get("num_channels", 3),
        "patch_size": cfg["patch_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "attention_head_dim": _heads(hidden, heads, "siglip2"),
        "mlp_hidden_dim": cfg["intermediate_size"],
        "mlp_type": _activation(cfg.get("hidden_act", "gelu_pytorch_tanh"), "siglip2"),
        "norm_eps": cfg.get("layer_norm_eps", 1e-6),
        "position_embedding_type": "learned",
        "pos_embed_grid_size": [side, side],
        "pos_embed_cls": False,
        "pos_embed_interpolation": "bilinear",
        "pos_embed_antialias": True,
        "use_cls_token": False,
        "pooling_type": "map" if use_head else "none",
    }


def _rope_theta(cfg: dict) -> float:
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _config_qwen2_vl(cfg: dict, keys: set[str]) -> dict:
    dim, heads = cfg["embed_dim"], cfg["num_heads"]
    return {
        "in_channels": cfg.get("in_channels", 3),
        "patch_size": cfg["patch_size"],
        "temporal_patch_size": cfg.get("temporal_patch_size", 2),
        "patch_bias": False,
        "num_layers": cfg["depth"],
        "num_attention_heads": heads,
        "attention_head_dim": _heads(dim, heads, "qwen2_vl"),
        "mlp_hidden_dim": int(dim * cfg.get("mlp_ratio", 4)),
        "mlp_type": _activation(cfg.get("hidden_act", "quick_gelu"), "qwen2_vl"),
        "norm_eps": 1e-6,
        "position_embedding_type": "rope",
        "rope_theta": _rope_theta(cfg),
        "use_cls_token": False,
        "final_norm": "none",
        "pooling_type": "none",
        "spatial_merge_size": cfg.get("spatial_merge_size", 2),
        "merger_out_dim": cfg["hidden_size"],
    }


def _config_qwen2_5_vl(cfg: dict, keys: set[str]) -> dict:
    dim, heads = cfg["hidden_size"], cfg["num_heads"]
    merge, patch = cfg.get("spatial_merge_size", 2), cfg["patch_size"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"qwen2_5_vl: only the SwiGLU (silu) MLP is supported, got hidden_act={cfg['hidden_act']!r}")
    return {
        "in_channels": cfg.get("in_channels", 3),
        "patch_size": patch,
        "temporal_patch_size": cfg.get("temporal_patch_size", 2),
        "patch_bias": False,
        "num_layers": cfg["depth"],
        "num_attention_heads": heads,
        "attention_head_dim": _heads(dim, heads, "qwen2_5_vl"),
        "mlp_hidden_dim": cfg["intermediate_size"],
        "mlp_type": "swiglu",
        "norm_type": "rms",
        "norm_eps": 1e-6,
        "position_embedding_type": "rope",
        "rope_theta": _rope_theta(cfg),
        "use_cls_token": False,
        "final_norm": "none",
        "pooling_type": "none",
        "spatial_merge_size": merge,
        "merger_out_dim": cfg["out_hidden_size"],
        # the reference sizes windows in pixels on the merged grid: window_size // merge // patch merged units
        "window_size": cfg.get("window_size", 112) // merge // patch * merge,
        "full_attention_layers": list(cfg.get("fullatt_block_indexes", [])),
    }


# ----------------------------------------------------------------------------------------------- key renaming
# Each rule: (regex on the source key, replacement in genvis names, optional tensor transform name).
_ATTN_SPLIT = [
    (r"attention\.attention\.query\.", "attn.to_q."),
    (r"attention\.attention\.key\.", "attn.to_k."),
    (r"attention\.attention\.value\.", "attn.to_v."),
    (r"attention\.output\.dense\.", "attn.to_out."),
]
_RULES: dict[str, list[tuple[str, str]]] = {
    "vit": [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        *[(rf"^encoder\.layer\.(\d+)\.{src}", rf"blocks.\1.{dst}") for src, dst in _ATTN_SPLIT],
        (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"^layernorm\.", "norm."),
        (r"^pooler\.dense\.", "pooler_dense."),
    ],
    "clip": [
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^pre_layrnorm\.", "norm_pre."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.q_proj\.", r"blocks.\1.attn.to_q."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.k_proj\.", r"blocks.\1.attn.to_k."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"blocks.\1.attn.to_v."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.to_out."),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
        (r"^post_layernorm\.", "norm."),
    ],
    "dinov2_with_registers": [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        *[(rf"^encoder\.layer\.(\d+)\.{src}", rf"blocks.\1.{dst}") for src, dst in _ATTN_SPLIT],
        (r"^encoder\.layer\.(\d+)\.norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layer\.(\d+)\.norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.layer_scale1"),
        (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.layer_scale2"),
        (r"^encoder\.layer\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
        (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.weights_in."),  # split below
        (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w2."),
        (r"^layernorm\.", "norm."),
    ],
    "qwen2_vl": [
        (r"^patch_embed\.proj\.", "patch_embed.proj."),
        (r"^blocks\.(\d+)\.norm1\.", r"blocks.\1.norm1."),
        (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.attn.qkv."),  # split below
        (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.to_out."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
        (r"^blocks\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.w1."),
        (r"^blocks\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.w3."),
        (r"^blocks\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.w2."),
        (r"^merger\.ln_q\.", "merger.norm."),
        (r"^merger\.mlp\.0\.", "merger.fc1."),
        (r"^merger\.mlp\.2\.", "merger.fc2."),
    ],
}
_RULES["siglip2"] = [
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),  # (ph, pw, C) linear -> conv kernel below
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    *[rule for rule in _RULES["clip"] if "encoder" in rule[0]],
    (r"^post_layernorm\.", "norm."),
    (r"^head\.probe$", "map_head.probe"),
    (r"^head\.attention\.in_proj_(weight|bias)$", r"map_head.attn.in_proj.\1"),  # split below
    (r"^head\.attention\.out_proj\.", "map_head.attn.to_out."),
    (r"^head\.layernorm\.", "map_head.norm."),
    (r"^head\.mlp\.fc1\.", "map_head.mlp.fc1."),
    (r"^head\.mlp\.fc2\.", "map_head.mlp.fc2."),
]
_RULES["qwen2_5_vl"] = _RULES["qwen2_vl"]

_FAMILIES: dict[str, tuple[str, Callable[[dict, set[str]], dict]]] = {
    "vit": ("vit", _config_vit),
    "clip_vision_model": ("clip", _config_clip),
    "clip": ("clip", _config_clip),
    "siglip2_vision_model": ("siglip2", _config_siglip2),
    "siglip2": ("siglip2", _config_siglip2),
    "dinov2_with_registers": ("dinov2_with_registers", _config_dinov2_registers),
    "qwen2_vl_vision": ("qwen2_vl", _config_qwen2_vl),
    "qwen2_vl": ("qwen2_vl", _config_qwen2_vl),
    "qwen2_5_vl_vision": ("qwen2_5_vl", _config_qwen2_5_vl),
    "qwen2_5_vl": ("qwen2_5_vl", _config_qwen2_5_vl),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


def _vision_config(hf_config: dict) -> tuple[str, dict]:
    model_type = hf_config.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported checkpoint model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type in ("clip", "siglip2", "qwen2_vl", "qwen2_5_vl"):
        vision = hf_config.get("vision_config")
        if vision is None:
            raise ValueError(f"{model_type} config has no vision_config")
        return model_type, vision
    return model_type, hf_config


def genvis_config_from_transformers(hf_config: dict, keys: set[str] | None = None) -> dict:
    """The :class:`VisionTransformerModel` config for a transformers ``config.json`` dict.

    Args:
        hf_config: the parsed ``config.json``.
        keys: the checkpoint's (un-prefixed) keys, used where the config does not say whether a head exists.
    """
    model_type, vision = _vision_config(hf_config)
    _, make_config = _FAMILIES[model_type]
    return make_config(vision, keys or set())


def _strip_prefix(state_dict: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Pick the prefix under which the vision weights live and return those keys without it."""
    anchors = {
        "vit": "embeddings.patch_embeddings.projection.weight",
        "clip": "embeddings.patch_embedding.weight",
        "siglip2": "embeddings.patch_embedding.weight",
        "dinov2_with_registers": "embeddings.patch_embeddings.projection.weight",
        "qwen2_vl": "patch_embed.proj.weight",
        "qwen2_5_vl": "patch_embed.proj.weight",
    }
    anchor = anchors[family]
    if anchor in state_dict:
        prefix = ""
    else:
        prefix = next((p for p in _PREFIXES if p + anchor in state_dict), None)
        if prefix is None:
            sample = sorted(state_dict)[:8]
            raise ValueError(
                f"checkpoint does not look like a {family} vision model: no key '{anchor}' with or without the "
                f"prefixes {list(_PREFIXES)}; first keys: {sample}"
            )
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def convert_transformers_state_dict(
    state_dict: dict[str, torch.Tensor], hf_config: dict
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert a transformers vision state dict (on-disk names) to ``(genvis_config, genvis_state_dict)``.

    Raises:
        ValueError: unknown ``model_type``, or source keys that no rule maps (named).
    """
    model_type, _ = _vision_config(hf_config)
    family = _FAMILIES[model_type][0]
    source = _strip_prefix(state_dict, family)
    config = genvis_config_from_transformers(hf_config, set(source))
    rules = [(re.compile(pattern), repl) for pattern, repl in _RULES[family]]
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in source.items():
        for pattern, repl in rules:
            if pattern.search(key):
                converted[pattern.sub(repl, key)] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} checkpoint keys have no {family} mapping (is this the right model_type?): "
            f"{sorted(unmapped)[:12]}"
        )
    return config, _reshape_tensors(converted, family, config)


def _reshape_tensors(sd: dict[str, torch.Tensor], family: str, config: dict) -> dict[str, torch.Tensor]:
    """Layout changes: token shapes, fused projections split, SigLIP 2 (ph, pw, C) patch vectors to conv kernels."""
    out = {}
    for key, tensor in sd.items():
        if key in ("cls_token", "mask_token", "register_tokens", "pos_embed", "map_head.probe"):
            tensor = tensor.reshape(-1, tensor.shape[-1])  # (1, n, D) / (D,) -> (n, D)
            if key == "mask_token":
                tensor = tensor.reshape(-1)
        if key.endswith(".qkv.weight") or key.endswith(".qkv.bias") or ".in_proj." in key:
            base = key.replace(".qkv.", ".").replace(".in_proj.", ".")
            head, leaf = base.rsplit(".", 1)
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                out[f"{head}.{name}.{leaf}"] = part
            continue
        if ".mlp.weights_in." in key:  # DINOv2 SwiGLU: [gate; up]
            gate, up = tensor.chunk(2, dim=0)
            out[key.replace("weights_in", "w1")] = gate
            out[key.replace("weights_in", "w3")] = up
            continue
        if family == "siglip2" and key == "patch_embed.proj.weight":
            p, channels = config["patch_size"], config["in_channels"]
            tensor = tensor.reshape(-1, p, p, channels).permute(0, 3, 1, 2)  # (D, ph, pw, C) -> (D, C, ph, pw)
        out[key] = tensor
    return out


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state_dict: dict[str, torch.Tensor] = {}
        for shard in shards:
            state_dict.update(load_file(str(path / shard)))
        return state_dict
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_transformers_vision_model(
    path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None, **config_overrides
) -> VisionTransformerModel:
    """Build a :class:`VisionTransformerModel` from a transformers ``save_pretrained`` folder (or hub snapshot).

    Args:
        path: folder with ``config.json`` and the weights.
        torch_dtype: cast the loaded model (default: keep fp32).
        config_overrides: genvis config fields to change (e.g. ``num_register_tokens`` must then stay consistent).

    Raises:
        ValueError: unknown model type, unmapped checkpoint keys, missing genvis weights or shape mismatches, each
            naming the keys.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json (expected a transformers save_pretrained folder)")
    hf_config = json.loads((path / "config.json").read_text())
    config, state_dict = convert_transformers_state_dict(_read_checkpoint(path), hf_config)
    model = VisionTransformerModel.from_config({**config, **config_overrides})
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: checkpoint does not fit the {hf_config.get('model_type')} config: missing keys "
            f"{missing[:12]}, unexpected keys {unexpected[:12]}, shape mismatches {mismatched[:12]}"
        )
    model.load_state_dict(state_dict, strict=True)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()
