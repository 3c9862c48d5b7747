"""Plain dicts <-> the config dataclasses, checking every key and type on the way in.

Hand-written on purpose: OmegaConf and pydantic both accept what these rules refuse (1 for a bool; OmegaConf
also 5 for a string, pydantic True and "5" for an integer), and OmegaConf reads `${...}` and `???` inside
plain strings as an interpolation and a missing value. The cases: docs/architecture.md, "The config system".
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Any, Literal

from .schema import ConfigError


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_validating = True


@contextlib.contextmanager
def without_validation():
    """`from_dict` checks keys and types but skips the `validate` rules inside: for reading a config saved by an
    older version whose rules were looser (a resumed run); what is built from it is validated as usual."""
    global _validating
    before, _validating = _validating, False
    try:
        yield
    finally:
        _validating = before


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and type; validates bottom-up."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; allowed keys here: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, f"{key}.{name}" if key else name) for name, value in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate") and _validating:
        obj.validate(key or "config")
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` as type `tp` (a dataclass, Literal, optional, list, tuple, dict or scalar), or a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin in (list, tuple):
        return _coerce_sequence(origin, args, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}: {value!r}")
        return dict(value)
    return _coerce_scalar(tp, value, key)


def _coerce_sequence(origin: type, args: tuple, value: Any, key: str) -> list | tuple:
    """A YAML list as list[X], tuple[X, ...] or a fixed-length tuple[X, Y]; entries are named key[i]."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {type(value).__name__}: {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}: {list(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    """bool, int, float or str, without the conversions that would hide a typo (1 for true, 5 for "5")."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {type(value).__name__}: {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf: no setting here means anything with them
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; people write it anyway
            try:
                parsed = float(value)
            except ValueError:
                parsed = None
            if parsed is not None and math.isfinite(parsed):
                return parsed
        raise ConfigError(f"{key} must be a number, got {type(value).__name__}: {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {type(value).__name__}: {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in a dataclass above
