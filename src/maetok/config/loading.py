"""Where a config comes from: YAML presets (with `_base_`), dotted command-line overrides, and the YAML saved in
every run directory and checkpoint.

    cfg = load_config(TokenizerRunConfig, "cpu-32", ["model.latent_tokens=64", "train.steps=100"])
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .coerce import from_dict, to_dict
from .schema import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.latent_tokens=64' -> (['model', 'latent_tokens'], 64). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a config section")
            node = nxt
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: cannot set a key inside a non-section")
        node[parts[-1]] = value
    return data


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or a preset name looked up under ./configs and the repository's configs/ (recursively)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for root in (Path.cwd() / "configs", CONFIG_DIR):
        for cand in (root / f"{name}.yaml", *root.glob(f"**/{name}.yaml")):
            if cand.is_file():
                return cand
    raise ConfigError(f"config {name!r} not found: give a YAML path or a preset name from {CONFIG_DIR}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)  # presets may extend another preset
    if base:
        data = _deep_merge(load_yaml(resolve_config_path(base)), data)
    return data


@dataclass(frozen=True)
class ConfigSource:
    """What `load_config` built a config from. A resumed run needs it to tell the values the user asked for
    (the overrides) from the preset's defaults, which the run's saved config replaces."""
    preset: str | None                  # the preset name or YAML path; None: defaults only
    preset_path: str | None             # the file it resolved to
    overrides: tuple[str, ...] = ()
    preset_given: bool = True           # False: the preset is a command's default, not the user's choice

    def override_keys(self) -> list[str]:
        """The dotted keys the overrides set, e.g. ["model.latent_tokens", "train.steps"]."""
        return [".".join(parse_override(o)[0]) for o in self.overrides]


_SOURCE_ATTR = "_maetok_source"


def config_source(cfg: Any) -> ConfigSource | None:
    """The `ConfigSource` of a config made by `load_config` from a preset and overrides; None otherwise."""
    return getattr(cfg, _SOURCE_ATTR, None)


def set_config_source(cfg: Any, source: ConfigSource | None) -> Any:
    if source is not None:
        object.__setattr__(cfg, _SOURCE_ATTR, source)
    return cfg


def load_config(cls: type, config: str | Path | dict | None = None, overrides: list[str] | None = None,
                default: str | None = None):
    """Defaults <- YAML preset (or dict) <- dotted overrides, then typed and validated. `default`: the preset
    used when `config` is None -- recorded as not chosen, so a resumed run keeps its own preset's values."""
    given = config is not None or default is None
    config = default if config is None else config
    data = to_dict(cls())
    path = None
    if isinstance(config, dict):
        data = _deep_merge(data, config)
    elif config:
        path = resolve_config_path(config)
        data = _deep_merge(data, load_yaml(path))
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(cls, data)
    if not isinstance(config, dict):  # a dict's keys are all "requested": no source, compared as a whole
        set_config_source(cfg, ConfigSource(str(config) if config else None, str(path.resolve()) if path else None,
                                            tuple(overrides or ()), given))
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
