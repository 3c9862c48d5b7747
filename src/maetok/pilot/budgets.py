"""The pilot's budgets: what each fixes, the same for every variant so that the comparison is fair."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from ..config import ConfigError, load_config, parse_override, to_dict

# A number in exponent form without a dot ("5e-3"): YAML 1.1 reads it as a string, people mean a number.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class PilotBudget:
    """Everything a budget fixes. Any field can be overridden on the command line (`maetok pilot --budget full
    image_size=256 tokenizer_preset=maetok-b-128`); `--tokenizer-set` / `--diffusion-set KEY=VALUE` add to the
    settings of the tokenizer / diffusion runs."""
    image_size: int = 32
    tokenizer_preset: str = "cpu-32"    # tokenizer config (preset name or YAML) the settings below apply to
    diffusion_preset: str = "sit-cpu"
    n_train: int = 2000                 # training images (0 = all)
    n_eval: int = 500                   # held-out images for rFID / reference; samples per gFID
    # Settings of every tokenizer run on tokenizer_preset, by dotted key ({"train.optim.lr": 5e-3}); they win over
    # the pilot's own (steps, sizes, data) and lose to MAETok's decoder fine-tuning settings.
    tokenizer: dict[str, Any] = field(default_factory=dict)
    tokenizer_steps: int = 400
    decoder_ft_steps: int = 100         # MAETok stage 2
    diffusion: dict[str, Any] = field(default_factory=dict)  # settings of every diffusion run on diffusion_preset
    diffusion_steps: int = 1500
    sampler: str = "euler"
    sample_steps: int = 20
    cfg_scale: float = 2.0
    cfg_interval: tuple[float, float] = (0.0, 0.75)
    gmm_ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    analysis_max_train: int = 10000     # latents used to fit PCA/GMM and the probe (bounded for CPU time)
    classifier_steps: int = 300
    cache_flip: bool = True
    vae_kl_weight: float = 1e-4

    def validate(self, key: str) -> None:
        for name in ("image_size", "n_eval", "tokenizer_steps", "diffusion_steps", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("n_train", "decoder_ft_steps", "classifier_steps", "analysis_max_train"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.gmm_ks or min(self.gmm_ks) < 1:
            raise ConfigError(f"gmm_ks={list(self.gmm_ks)} must be positive mixture sizes")
        if self.vae_kl_weight < 0:
            raise ConfigError(f"vae_kl_weight={self.vae_kl_weight} must be >= 0")
        # sampler, cfg_scale and cfg_interval are checked by SampleConfig when the plan is made


# A model this small trains stably at a high rate: 5e-3 is the best rFID of benchmarks/lr_sweep.py at the quick
# budget (benchmarks/results/lr-sweep-quick).
_TINY_TOKENIZER = {"model.enc_width": 64, "model.enc_depth": 2, "model.enc_heads": 2, "model.dec_width": 64,
                   "model.dec_depth": 2, "model.dec_heads": 2, "model.latent_tokens": 16, "model.latent_dim": 8,
                   "model.aux_width": 32, "model.aux_depth": 1, "model.aux_heads": 1, "train.batch_size": 32,
                   "train.optim.lr": 5e-3, "train.optim.warmup_steps": 100, "train.log_every": 20,
                   "train.image_every": 200, "train.ckpt_every": 200, "stats_batches": 10}
# 1.5e-3: high enough for guidance to matter within the quick budget's 800 steps.
_TINY_SIT = {"model.hidden": 128, "model.depth": 4, "model.heads": 2, "train.batch_size": 64,
             "train.optim.lr": 1.5e-3, "train.optim.warmup_steps": 100, "train.log_every": 25,
             "train.image_every": 500, "train.ckpt_every": 500}

BUDGETS: dict[str, PilotBudget] = {
    # ~10 minutes on 2 CPU cores (13 with one thread) for three variants on the built-in shapes. VAE KL weight
    # 1e-4 (the default): the best VAE gFID of 1e-4, 1e-5 and 1e-6 (benchmarks/results/vae-kl-quick).
    "quick": PilotBudget(n_train=5000, tokenizer=dict(_TINY_TOKENIZER), diffusion=dict(_TINY_SIT),
                         tokenizer_steps=1500, decoder_ft_steps=200, diffusion_steps=800),
    # ~60 minutes on 2 CPU cores on CIFAR-10 (one thread, the other core free): the small-scale reproduction of
    # the paper's table. Every stage is short of convergence; the budget is the same for every variant. Tokenizer
    # rate 4e-3: the best rFID for MAETok (benchmarks/results/lr-sweep-standard). VAE KL weight 1e-5: the best VAE
    # gFID of 1e-4, 1e-5 and 1e-6 (benchmarks/results/pilot-cifar-vae-kl1e-5-seed{0,1,2}).
    "standard": PilotBudget(
        n_train=0, n_eval=2000, tokenizer_steps=600, decoder_ft_steps=150, diffusion_steps=1000, sample_steps=16,
        tokenizer={"model.enc_width": 128, "model.enc_depth": 4, "model.enc_heads": 4, "model.dec_width": 128,
                   "model.dec_depth": 4, "model.dec_heads": 4, "model.latent_tokens": 32, "model.latent_dim": 12,
                   "model.aux_width": 64, "model.aux_depth": 2, "model.aux_heads": 2, "train.batch_size": 64,
                   "train.optim.lr": 4e-3, "train.optim.warmup_steps": 100, "train.log_every": 25,
                   "train.image_every": 500, "train.ckpt_every": 250, "stats_batches": 20},
        diffusion={"model.hidden": 128, "model.depth": 4, "model.heads": 2, "train.batch_size": 64,
                   "train.optim.lr": 5e-4, "train.optim.warmup_steps": 200, "train.log_every": 25,
                   "train.image_every": 1000, "train.ckpt_every": 500},
        classifier_steps=0, cache_flip=False, gmm_ks=(1, 2, 4, 8, 16, 32), vae_kl_weight=1e-5),
    # A minute-long run of every stage, for tests and for checking a set-up; its numbers mean nothing.
    "smoke": PilotBudget(n_train=256, n_eval=64, tokenizer_steps=30, decoder_ft_steps=10, diffusion_steps=60,
                         sample_steps=4, classifier_steps=40, gmm_ks=(1, 2, 4), tokenizer=dict(_TINY_TOKENIZER),
                         diffusion=dict(_TINY_SIT)),
    # GPU scale: the cpu presets at full width, longer; use torchrun for the training stages.
    "full": PilotBudget(n_train=0, n_eval=10000, tokenizer_steps=50000, decoder_ft_steps=10000,
                        diffusion_steps=100000, sampler="heun", sample_steps=50, classifier_steps=3000,
                        gmm_ks=(1, 2, 4, 8, 16, 32, 64),
                        tokenizer={"train.batch_size": 256, "train.optim.warmup_steps": 1000, "train.log_every": 100,
                                   "train.image_every": 5000, "train.ckpt_every": 2000, "stats_batches": 50},
                        diffusion={"train.batch_size": 256, "train.log_every": 100, "train.image_every": 10000,
                                   "train.ckpt_every": 5000}),
}


def check_budget(budget: str) -> None:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {sorted(BUDGETS)}")


def parse_setting(text: str) -> tuple[str, Any]:
    """'train.optim.lr=1e-3' -> ('train.optim.lr', 0.001): a command-line KEY=VALUE as a typed run setting."""
    parts, value = parse_override(text)
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        value = float(value)
    return ".".join(parts), value


def with_settings(settings: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`settings` with KEY=VALUE `overrides` applied in order. A key set again moves to the end: it is applied
    after every other setting, as the later of two command-line overrides is."""
    out = dict(settings)
    for text in overrides:
        key, value = parse_setting(text)
        out.pop(key, None)
        out[key] = value
    return out


def as_overrides(settings: dict[str, Any]) -> list[str]:
    """Run settings as the KEY=VALUE overrides `load_config` takes (which a resumed run re-applies to its saved
    config); each value in YAML that reads back as the same value."""
    return [f"{key}={_yaml_value(value)}" for key, value in settings.items()]


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n...\n").strip()


def pilot_settings(budget: str, overrides: list[str] | None = None, tokenizer_set: list[str] | None = None,
                   diffusion_set: list[str] | None = None) -> PilotBudget:
    """A budget with dotted overrides on its fields, and KEY=VALUE settings for its tokenizer / diffusion runs
    that win over the budget's own."""
    check_budget(budget)
    settings = load_config(PilotBudget, to_dict(BUDGETS[budget]), overrides or [])
    settings.tokenizer = with_settings(settings.tokenizer, tokenizer_set or [])
    settings.diffusion = with_settings(settings.diffusion, diffusion_set or [])
    return settings


def recorded_settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """Budget fields as a pilot_results.json records them, in the form PilotBudget takes: run settings recorded
    as lists of KEY=VALUE overrides become mappings."""
    out = dict(recorded)
    for name in ("tokenizer", "diffusion"):
        if isinstance(out.get(name), list):
            out[name] = with_settings({}, out[name])
    return out
