"""Settings a run's variant or stage does not use: named when asked for, never dropped in silence.

Only what was asked for is reported: the overrides (every field, for a config built in code) whose value differs
from its default. A preset's values are not: one preset serves every variant (the AE baseline is a MAETok preset
with `model.variant=ae`), so it may legitimately carry the mask and the auxiliary targets.
"""
from __future__ import annotations

from typing import Any

from .coerce import to_dict
from .loading import config_source
from .schema import ConfigError, TokenizerRunConfig

# Set by the pilot's budgets (and sweeps) for every variant alike: the KL weight and the auxiliary decoders'
# sizes. Reported at INFO level, so that the baselines' logs do not fill with warnings about what the pilot itself
# chose; the mask, the targets and decoder_ft.* are warnings.
SHARED_BY_VARIANTS = ("loss.kl_weight", "model.aux_width", "model.aux_depth", "model.aux_heads", "model.aux_loss_on")
_AUX_KEYS = ("model.aux_targets", "model.aux_width", "model.aux_depth", "model.aux_heads", "model.aux_loss_on")


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def _asked_for(cfg: Any) -> dict[str, Any]:
    """Dotted key -> value of every leaf that was asked for and differs from the default (lists are leaves)."""
    values, defaults = _leaves(to_dict(cfg)), _leaves(to_dict(type(cfg)()))
    source = config_source(cfg)
    given = None if source is None else source.override_keys()
    return {k: v for k, v in values.items() if v != defaults.get(k) and
            (given is None or any(k == g or k.startswith(g + ".") for g in given))}


def _unused_by(cfg: TokenizerRunConfig, key: str) -> str | None:
    """Why `key` has no effect on this run; None when it has one."""
    variant = cfg.model.variant
    if key.startswith("model.mask.") and not cfg.model.uses_mask:
        return f"model.variant={variant} masks no patches (only maetok and mae do)"
    if key.startswith(_AUX_KEYS) and variant != "maetok":
        return f"model.variant={variant} has no auxiliary decoders (only maetok does)"
    if key == "loss.kl_weight" and variant != "vae":
        return f"model.variant={variant} has no KL term (only vae does)"
    if key.startswith("decoder_ft.") and cfg.stage == 1:
        return "it applies to decoder fine-tuning (stage=2) only, and this is stage 1"
    return None


def ignored_settings(cfg: Any) -> list[tuple[str, str]]:
    """(dotted key, message) for each setting asked for that this run does not use. Raises ConfigError for
    decoder_ft.init_from in stage 1: the weights to fine-tune were named, so stage=2 was surely forgotten."""
    if not isinstance(cfg, TokenizerRunConfig):
        return []
    unused = []
    for key, value in _asked_for(cfg).items():
        reason = _unused_by(cfg, key)
        if reason is None:
            continue
        if key == "decoder_ft.init_from":
            raise ConfigError(f"decoder_ft.init_from={value} is set but stage=1: add stage=2 to fine-tune that "
                              f"model's decoder, or drop decoder_ft.init_from to train a tokenizer")
        unused.append((key, f"{key}={value!r} is ignored: {reason}"))
    return unused
