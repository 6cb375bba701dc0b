"""Strict loading of nested training dataclasses from YAML presets plus ``--set a.b=value`` overrides.

An unknown key is an error naming the file, the key path and close matches (a typo must not be silently ignored);
a value of the wrong type is an error naming the field, the expected type and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "add_config_arguments",
    "config_from_args",
    "config_to_dict",
    "load_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset or override does not fit the config dataclass."""


@dataclasses.dataclass
class CheckpointConfig:
    """The ``checkpoint:`` section every ``train/<family>.py`` config shares.

    Args:
        every_steps: save an atomic checkpoint every this many optimizer steps.
        total_limit: complete checkpoints kept (older ones are pruned after a successful save).
        resume: continue from the newest complete checkpoint under ``<output_dir>/checkpoints`` when one exists.
    """

    every_steps: int = 100
    total_limit: int = 2
    resume: bool = True


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(annotation) or (Any,)
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return _build(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "2e-3" (no dot) as a string; accept any float literal Python accepts
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r} (str)") from None
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
        return value
    return value


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides.

    Override values are parsed as YAML (``--set optim.lr=3e-4 model.preset=tiny data.sizes=[32,64]``).
    """
    data = config_to_dict(cls())
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        _build(cls, loaded, str(path))  # strict check against the file's own keys, naming the file
        data = _merge(data, loaded)
        source = str(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        nested: dict = yaml.safe_load(raw) if raw.strip() else None
        for key in reversed(keys):
            nested = {key: nested}
        try:
            _build(cls, _merge(config_to_dict(cls()), nested), "")
        except ConfigError as err:
            raise ConfigError(f"--set {item}: {err}") from None
        data = _merge(data, nested)
    return _build(cls, data, source if not overrides else f"{source} + --set")


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | Path | None = None) -> None:
    parser.add_argument("--config", default=str(default_config) if default_config else None, help="YAML preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. optim.lr=1e-4",
    )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(cls, args.config, args.overrides)
