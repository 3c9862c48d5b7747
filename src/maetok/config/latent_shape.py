"""A diffusion model's token count and width on a latent cache: the cache's, unless given."""
from __future__ import annotations

import logging
from typing import Any

from .loading import config_source
from .schema import ConfigError

log = logging.getLogger("maetok.config")

_SHAPE_KEYS = ("model.num_tokens", "model.in_channels")


def fit_model_to_latents(cfg: Any, shape: tuple[int, int], where: str) -> None:
    """Set cfg.model.num_tokens / in_channels to the latents' (tokens, dim) where they were not given (an override,
    or every field of a config built in code), logging what was taken; a given value that differs is refused.
    A preset's values are defaults: sit-cpu serves any cache. `where` names the latents in messages."""
    source = config_source(cfg)
    given = None if source is None else source.override_keys()
    for key, value in zip(_SHAPE_KEYS, shape):
        name = key.split(".")[1]
        asked = getattr(cfg.model, name)
        if given is None or key in given or "model" in given:
            if asked != value:
                raise ConfigError(f"{key}={asked} but the latents are {shape[0]} tokens of dim {shape[1]} "
                                  f"({where}); drop {key} to take it from them")
        elif asked != value:
            log.info("%s=%d, taken from the latents (%s)", key, value, where)
            setattr(cfg.model, name, value)
