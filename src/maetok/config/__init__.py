"""One config system for every run: dataclasses, YAML presets and dotted command-line overrides.

    cfg = load_config(TokenizerRunConfig, "cpu-32", ["model.latent_tokens=64", "train.steps=100"])

Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the dotted key and what is
allowed, before any work starts. The resolved config is saved (YAML) in every run directory and checkpoint.

    schema   the dataclasses, their defaults and `validate` rules
    coerce   plain dict <-> dataclass, checking every key and type
    loading  presets, overrides, `load_config`, `dump_yaml`, where a config came from
"""
from .coerce import from_dict, to_dict, without_validation
from .ignored import SHARED_BY_VARIANTS, ignored_settings
from .latent_shape import fit_model_to_latents
from .loading import (CONFIG_DIR, ConfigSource, apply_overrides, config_source, dump_yaml, load_config, load_yaml,
                      parse_override, resolve_config_path, set_config_source)
from .schema import (AuxTargetConfig, ConfigError, DataConfig, DecoderFinetuneConfig, DiffusionRunConfig, GanConfig,
                     MaskConfig, OptimConfig, SampleConfig, SiTConfig, TokenizerConfig, TokenizerLossConfig,
                     TokenizerRunConfig, TrainConfig, TransportConfig, check_seed)

__all__ = [
    "AuxTargetConfig", "CONFIG_DIR", "ConfigError", "ConfigSource", "DataConfig", "DecoderFinetuneConfig",
    "DiffusionRunConfig", "GanConfig", "MaskConfig", "OptimConfig", "SHARED_BY_VARIANTS", "SampleConfig", "SiTConfig",
    "TokenizerConfig", "fit_model_to_latents", "ignored_settings",
    "TokenizerLossConfig", "TokenizerRunConfig", "TrainConfig", "TransportConfig", "apply_overrides", "check_seed",
    "config_source", "dump_yaml", "from_dict", "load_config", "load_yaml", "parse_override", "resolve_config_path",
    "set_config_source", "to_dict", "without_validation",
]
