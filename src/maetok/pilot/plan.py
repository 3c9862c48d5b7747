"""A pilot as one typed value: the data, the variants, the budget's settings, and every run config they resolve to.

    plan = PilotPlan.from_budget("smoke", "shapes", ["ae", "maetok"], "runs/pilot", facts,
                                 tokenizer_set=["train.optim.lr=1e-3"])
    PilotPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan

`facts` are what the plan needs to know of the data (`open_pilot_data(...).facts`). The run configs are made
with `load_config` from the budget's presets and settings, so that each training run records, and re-applies on
resume, the same preset and overrides as `maetok tokenizer train` / `maetok diffusion train` would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import (ConfigError, DiffusionRunConfig, SampleConfig, TokenizerRunConfig, from_dict, load_config,
                      to_dict)
from ..io.distributed import DistInfo
from ..plugins import plugins_for_config
from ..train.loop import check_global_batch
from .budgets import PilotBudget, as_overrides, check_budget, pilot_settings, recorded_settings
from .target_sets import aux_targets_override, base_variant, check_set_variant, set_targets, variant_folder

VARIANTS = ("ae", "vae", "maetok", "mae")
# Small-scale semantic teacher for MAETok on CIFAR-10: the CIFAR ResNet-56 stands in for DINOv2/SigLIP (cannot be
# had here).
CIFAR_TEACHER = ("model.aux_targets=[{name: hog, weight: 1.0}, {name: resnet-cifar, weight: 1.0, "
                 "options: {arch: resnet56, layer: layer2}}]")
# Recomputed from the inputs when a plan is read back: they are kept in to_dict for the record.
RESOLVED = ("n_eval", "tokenizer_runs", "diffusion_runs", "sampling")


@dataclass
class DataFacts:
    """What a plan needs to know of its data; read when the data is opened."""
    num_classes: int
    cifar10: bool           # the classes are CIFAR-10's (at 32 px the pilot then uses the CIFAR networks)
    train_images: int
    held_out_images: int


@dataclass
class TokenizerRun:
    """One tokenizer training of a variant; MAETok's decoder fine-tuning is a second one."""
    stage: str              # its key among the variant's stage results
    folder: str             # its run folder, in the variant's folder
    config: TokenizerRunConfig


def check_request(budget: str, variants: list[str]) -> None:
    check_budget(budget)
    bad = [v for v in variants if v not in VARIANTS and set_targets(v) is None]
    if bad or not variants:
        raise ConfigError(f"unknown variants {bad or variants}; choose from {', '.join(VARIANTS)} (or target sets "
                          f"such as maetok[hog+sobel], see --target-sets)")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"variants {variants} name one twice")
    for variant in variants:
        check_set_variant(variant)


def _differs(recorded: Any, now: Any) -> bool:
    """Whether a recorded resolved value differs from today's. A key today's has and the record lacks is a setting
    added since the record was made: it does not count (the record's run ran without it)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        return any(key not in now or _differs(value, now[key]) for key, value in recorded.items())
    return recorded != now


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (lists for tuples)."""
    return json.loads(json.dumps(value))


@dataclass
class PilotPlan:
    """Everything a pilot will do. Inputs: the fields up to `inception`; the rest is resolved from them when the
    plan is made (each checked: a typo in a setting fails here, before any work), and again by
    `dataclasses.replace(plan, settings=...)`."""
    data: str                   # data spec
    variants: list[str]
    budget: str                 # the budget the settings started from
    settings: PilotBudget
    out: Path
    facts: DataFacts
    device: str = "cpu"
    inception: bool = False     # also compute Inception FIDs
    n_eval: int = field(init=False)  # images per evaluation: n_eval, or the whole held-out split when smaller
    tokenizer_runs: dict[str, list[TokenizerRun]] = field(init=False)
    diffusion_runs: dict[str, DiffusionRunConfig] = field(init=False)
    sampling: dict[str, SampleConfig] = field(init=False)   # "nocfg", then "cfg" at the budget's scale

    def __post_init__(self) -> None:
        check_request(self.budget, self.variants)
        self.out = Path(self.out)
        # Reference, samples and reconstructions have the same count, as FID needs.
        self.n_eval = min(self.settings.n_eval, self.facts.held_out_images)
        self.tokenizer_runs, self.diffusion_runs = {}, {}
        for variant in self.variants:
            self.tokenizer_runs[variant] = self._tokenizer_runs(variant)
            self.diffusion_runs[variant] = self._diffusion_config(variant)
        self.sampling = {"nocfg": self._sample_config(1.0), "cfg": self._sample_config(self.settings.cfg_scale)}

    @classmethod
    def from_budget(cls, budget: str, data: str, variants: list[str], out: str | Path, facts: DataFacts, *,
                    overrides: list[str] | None = None, tokenizer_set: list[str] | None = None,
                    diffusion_set: list[str] | None = None, device: str = "cpu", inception: bool = False) -> PilotPlan:
        """The plan of `maetok pilot --budget BUDGET [--tokenizer-set ...] [--diffusion-set ...] [OVERRIDES]`."""
        settings = pilot_settings(budget, overrides, tokenizer_set, diffusion_set)
        return cls(data, list(variants), budget, settings, Path(out), facts, device, inception)

    @property
    def cifar10(self) -> bool:
        return self.facts.cifar10 and self.settings.image_size == 32

    def variant_dir(self, variant: str) -> Path:
        """The variant's folder: its runs, latents, pictures and results (a target set's without brackets)."""
        return self.out / variant_folder(variant)

    def tokenizer_dir(self, variant: str) -> Path:
        """The run whose weights the variant's latents come from: MAETok's decoder fine-tuning when it has one."""
        return self.variant_dir(variant) / self.tokenizer_runs[variant][-1].folder

    def _tokenizer_runs(self, variant: str) -> list[TokenizerRun]:
        runs = [TokenizerRun("tokenizer_train", "tokenizer", self._tokenizer_config(variant, 1))]
        if base_variant(variant) == "maetok" and self.settings.decoder_ft_steps > 0:
            runs.append(TokenizerRun("decoder_finetune", "tokenizer-ft", self._tokenizer_config(variant, 2)))
        return runs

    def _tokenizer_config(self, variant: str, stage: int) -> TokenizerRunConfig:
        settings = self.settings
        overrides = [f"model.variant={base_variant(variant)}", f"model.image_size={settings.image_size}",
                     f"data.image_size={settings.image_size}", f"data.spec={self.data}", "data.split=train",
                     f"data.limit={settings.n_train}", f"train.steps={settings.tokenizer_steps}",
                     f"loss.kl_weight={settings.vae_kl_weight}"]
        if self.cifar10 and variant == "maetok":
            # A default, so it goes before the budget's settings: `--tokenizer-set model.aux_targets=...` wins.
            overrides.append(CIFAR_TEACHER)
        overrides += as_overrides(settings.tokenizer)
        if set_targets(variant) is not None:  # the set is what the variant compares: it wins over the settings
            overrides.append(aux_targets_override(variant))
        if stage == 2:
            steps = settings.decoder_ft_steps
            overrides += ["stage=2", f"decoder_ft.init_from={self.variant_dir(variant) / 'tokenizer'}",
                          f"train.steps={steps}",
                          f"decoder_ft.anneal_steps={max(1, steps // 2)}", "train.optim.warmup_steps=0"]
        return load_config(TokenizerRunConfig, settings.tokenizer_preset, overrides)

    def _diffusion_config(self, variant: str) -> DiffusionRunConfig:
        """The same diffusion model for every variant, sized to the variant's latents."""
        settings, tokenizer = self.settings, self.tokenizer_runs[variant][0].config.model
        return load_config(DiffusionRunConfig, settings.diffusion_preset, [
            f"latents={self.variant_dir(variant) / 'latents-train'}",
            f"tokenizer={self.tokenizer_dir(variant) / 'model'}",
            f"model.num_tokens={tokenizer.latent_tokens}", f"model.in_channels={tokenizer.latent_dim}",
            f"model.num_classes={self.facts.num_classes}", f"train.steps={settings.diffusion_steps}",
            f"sample.sampler={settings.sampler}", f"sample.steps={settings.sample_steps}",
            # Models at a quarter, half and three quarters of training: the report's learning curve (gFID).
            f"train.snapshot_every={max(1, settings.diffusion_steps // 4)}",
            *as_overrides(settings.diffusion)])

    def _sample_config(self, cfg_scale: float) -> SampleConfig:
        settings = self.settings
        return from_dict(SampleConfig, {"sampler": settings.sampler, "steps": settings.sample_steps,
                                        "cfg_scale": cfg_scale, "cfg_interval": list(settings.cfg_interval),
                                        "seed": 0}, key="pilot")

    def check_fits(self, world: int) -> None:
        """Every run's global batch against the training split, split over `world` processes."""
        for variant in self.variants:
            for model, cfg in (("tokenizer", self.tokenizer_runs[variant][0].config),
                               ("diffusion", self.diffusion_runs[variant])):
                try:
                    check_global_batch(self.facts.train_images, cfg.train.batch_size, world)
                except ConfigError as e:
                    raise ConfigError(f"{self.data}, {model} runs: {e}; change it with --{model}-set "
                                      f"train.batch_size=N, or add images") from None

    def record(self, dist: DistInfo) -> dict[str, Any]:
        """What pilot_results.json keeps of the plan, with where it runs; the report shows it."""
        record = {"data": self.data, "variants": self.variants, "budget": self.budget,
                  "settings": to_dict(self.settings), "device": str(dist.device), "world_size": dist.world,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}
        # The plugins whose targets the runs use, loaded again when the pilot is resumed (`run_pilot`).
        plugins = {json.dumps(p, sort_keys=True): p for runs in self.tokenizer_runs.values() for run in runs
                   for p in plugins_for_config(run.config)}
        return {**record, "plugins": list(plugins.values())} if plugins else record

    def check_same_settings(self, recorded: dict[str, Any] | None) -> None:
        """A resumed pilot must keep its settings (`recorded`: what `record` gave when it started): otherwise its
        finished stages and the new ones would not be comparable, and the report would silently mix them."""
        if not recorded:
            return
        now = _plain(to_dict(self.settings))
        # A field the record lacks counts as its default there.
        before = {**_plain(to_dict(PilotBudget())), **_plain(recorded_settings(recorded.get("settings", {})))}
        diff = {k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)}
        if recorded.get("data") != self.data:
            diff["data"] = (recorded.get("data"), self.data)
        if diff:
            budget = recorded.get("budget")
            why = (f"it ran --budget {budget}, this asks for --budget {self.budget}; "
                   if budget and budget != self.budget else "")
            raise ConfigError(f"pilot {self.out} was started with other settings ({why}{diff} as (before, now)); "
                              f"resume it with the same ones, or start over with --force (deletes it) or a new --out")

    def to_dict(self) -> dict[str, Any]:
        """The plan in JSON values: its inputs, then what they resolve to."""
        return {"data": self.data, "variants": list(self.variants), "budget": self.budget,
                "settings": to_dict(self.settings), "out": str(self.out), "facts": to_dict(self.facts),
                "device": self.device, "inception": self.inception, "n_eval": self.n_eval,
                "tokenizer_runs": to_dict(self.tokenizer_runs), "diffusion_runs": to_dict(self.diffusion_runs),
                "sampling": to_dict(self.sampling)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PilotPlan:
        """The plan `to_dict` gave. What it resolves to is made again from its inputs, and refused where it
        differs from the recorded one (a preset that changed since would otherwise change the runs silently)."""
        plan = cls(data["data"], list(data["variants"]), data["budget"],
                   from_dict(PilotBudget, data["settings"], "settings"), Path(data["out"]),
                   from_dict(DataFacts, data["facts"], "facts"), data.get("device", "cpu"),
                   data.get("inception", False))
        now = plan.to_dict()
        changed = [k for k in RESOLVED if k in data and _differs(_plain(data[k]), _plain(now[k]))]
        if changed:
            raise ConfigError(f"plan for {plan.out}: {', '.join(changed)} differ from what its settings give now; "
                              f"make the plan again from its settings")
        return plan
