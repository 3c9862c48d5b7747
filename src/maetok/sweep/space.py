"""The search space of a sweep: a small YAML file of parameters, each naming the pilot setting it sets.

    variant: maetok                        # the pilot variant every trial trains
    parameters:
      latent_tokens: {type: int, low: 8, high: 64, log: true, set: tokenizer.model.latent_tokens}
      tokenizer_lr: {type: float, low: 0.25, high: 4, log: true, set: tokenizer.train.optim.lr,
                     times: tokenizer.train.optim.lr}   # a factor on the budget's own rate
      aux_targets: {type: categorical, choices: [hog, hog+sobel, none], set: tokenizer.model.aux_targets}
      hog_weight: {type: float, low: 0.1, high: 4, log: true, set: tokenizer.model.aux_targets.hog.weight}

`set` names a setting: `tokenizer.KEY` / `diffusion.KEY` (a dotted key of the tokenizer / diffusion runs, as
`--tokenizer-set` takes) or a budget field (`decoder_ft_steps`). `times: KEY` makes the value a factor on the
budget's value of KEY (integer settings are rounded), so that one space serves every budget. The auxiliary targets
are a categorical of target sets (`hog+sobel`; `none` for no target); a target's weight
(`tokenizer.model.aux_targets.NAME.weight`) is a parameter only in trials whose set holds that target. `when:
{OTHER: [values]}` makes any parameter conditional on an earlier one. The default configuration (the budget's
own values) is each parameter's `default_params`: the sweep's trial 0.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import optuna

from ..config import CONFIG_DIR, ConfigError, load_yaml, to_dict
from ..pilot import PilotBudget, PilotPlan
from ..pilot.plan import VARIANTS
from ..tokenizer.targets import TARGETS

log = logging.getLogger("maetok.sweep")

TARGET_SET = "tokenizer.model.aux_targets"
_TARGET_WEIGHT = re.compile(r"tokenizer\.model\.aux_targets\.([A-Za-z0-9_.-]+)\.weight")
NO_TARGET = "none"
TYPES = ("float", "int", "categorical")
_KEYS = {"type", "low", "high", "log", "step", "choices", "set", "times", "when"}
# Fields of a budget a parameter may set directly (its run settings are set key by key: tokenizer.KEY).
_BUDGET_FIELDS = {f.name for f in fields(PilotBudget)} - {"tokenizer", "diffusion"}


@dataclass(frozen=True)
class Parameter:
    """One line of the space file: an Optuna distribution, the setting it sets and when it exists."""
    name: str
    type: str
    set: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    times: str | None = None
    when: dict[str, tuple] = field(default_factory=dict)

    @property
    def target_weight(self) -> str | None:
        """The auxiliary target whose weight this parameter sets, if it does."""
        match = _TARGET_WEIGHT.fullmatch(self.set)
        return match.group(1) if match else None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))

    def values_to_check(self) -> list:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def target_names(choice: str) -> list[str]:
    """'hog+sobel' -> ['hog', 'sobel']; 'none' -> []."""
    return [] if choice == NO_TARGET else choice.split("+")


def _parse_parameter(name: str, spec: Any, where: str) -> Parameter:
    here = f"{where}: parameter {name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: must be a mapping with type, set and a range or choices")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ConfigError(f"{here}: unknown key {unknown[0]!r}; a parameter has {', '.join(sorted(_KEYS))}")
    kind, key = spec.get("type"), spec.get("set")
    if kind not in TYPES:
        raise ConfigError(f"{here}: type {kind!r}; choose {', '.join(TYPES)}")
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{here}: `set` must name the setting it sets (tokenizer.KEY, diffusion.KEY or a budget "
                          f"field such as decoder_ft_steps)")
    times, when = spec.get("times"), spec.get("when") or {}
    if times is not None and not (isinstance(times, str) and times):
        raise ConfigError(f"{here}: `times` must name the setting whose budget value the parameter multiplies")
    if not isinstance(when, dict):
        raise ConfigError(f"{here}: `when` must map earlier parameters to the values it needs, e.g. {{aux: [hog]}}")
    when = {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}
    common = dict(name=name, type=kind, set=key, times=times, when=when)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{here}: a categorical needs a non-empty list of choices")
        if len(set(map(str, choices))) != len(choices):
            raise ConfigError(f"{here}: choices {choices} name one twice")
        return Parameter(**common, choices=tuple(choices))
    low, high, log_scale, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
    for label, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{here}: {label} must be a number, got {value!r}")
        if kind == "int" and value != int(value):
            raise ConfigError(f"{here}: an int parameter needs whole numbers, got {label}={value}")
    if not low < high:
        raise ConfigError(f"{here}: the range [{low}, {high}] is empty; low must be below high")
    if log_scale and low <= 0:
        raise ConfigError(f"{here}: a log-scale range must be positive, got low={low}")
    if log_scale and step is not None:
        raise ConfigError(f"{here}: a log-scale range takes no step (Optuna samples it continuously)")
    if step is not None and step <= 0:
        raise ConfigError(f"{here}: step must be positive, got {step}")
    return Parameter(**common, low=low, high=high, log=log_scale, step=step)


@dataclass(frozen=True)
class SearchSpace:
    variant: str
    parameters: tuple[Parameter, ...]
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict, source: str = "search space") -> SearchSpace:
        unknown = sorted(set(data) - {"variant", "parameters"})
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}; a search space has variant and parameters")
        variant = data.get("variant", "maetok")
        if variant not in VARIANTS:
            raise ConfigError(f"{source}: variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        params = data.get("parameters")
        if not isinstance(params, dict) or not params:
            raise ConfigError(f"{source}: `parameters` must map each parameter's name to its range or choices")
        space = cls(variant, tuple(_parse_parameter(str(n), s, source) for n, s in params.items()), source)
        space._check_structure()
        return space

    def to_dict(self) -> dict:
        """The space as its YAML file would give it (what a study records, to refuse a worker with another)."""
        out = {}
        for p in self.parameters:
            spec = {"type": p.type, "set": p.set}
            spec |= {"choices": list(p.choices)} if p.type == "categorical" else {"low": p.low, "high": p.high}
            spec |= {k: v for k, v in (("log", p.log), ("step", p.step), ("times", p.times)) if v}
            if p.when:
                spec["when"] = {k: list(v) for k, v in p.when.items()}
            out[p.name] = spec
        return {"variant": self.variant, "parameters": out}

    def _check_structure(self) -> None:
        where, seen, sets = self.source, {}, {}
        for p in self.parameters:
            here = f"{where}: parameter {p.name}"
            for other, allowed in p.when.items():
                if other not in seen:
                    raise ConfigError(f"{here}: `when` names {other!r}, which is not a parameter declared above it")
                bad = [v for v in allowed if seen[other].type == "categorical" and v not in seen[other].choices]
                if bad:
                    raise ConfigError(f"{here}: `when` {other} = {bad[0]!r} is not one of its choices")
            if p.set in sets:
                raise ConfigError(f"{here}: sets {p.set}, which {sets[p.set]} sets already")
            if p.set == TARGET_SET:
                self._check_target_sets(p, here)
            if p.target_weight and p.type == "categorical":
                raise ConfigError(f"{here}: a target's weight must be a float or int range")
            if p.set == TARGET_SET or p.target_weight:
                if self.variant != "maetok":
                    raise ConfigError(f"{here}: auxiliary targets are MAETok's; this space's variant is {self.variant}")
            elif not p.set.startswith(("tokenizer.", "diffusion.")) and p.set not in _BUDGET_FIELDS:
                raise ConfigError(f"{here}: unknown setting {p.set!r}; name tokenizer.KEY, diffusion.KEY or a budget "
                                  f"field ({', '.join(sorted(_BUDGET_FIELDS))})")
            seen[p.name], sets[p.set] = p, p.name
        chooser = self.target_chooser
        for p in self.parameters:
            if p.target_weight and chooser and not any(p.target_weight in target_names(c) for c in chooser.choices):
                raise ConfigError(f"{where}: parameter {p.name} weighs target {p.target_weight!r}, which no choice "
                                  f"of {chooser.name} holds")

    @staticmethod
    def _check_target_sets(p: Parameter, here: str) -> None:
        if p.type != "categorical":
            raise ConfigError(f"{here}: the auxiliary targets are a categorical of target sets such as hog+sobel")
        for choice in p.choices:
            names = target_names(str(choice))
            unknown = [n for n in names if n not in TARGETS]
            if unknown or not isinstance(choice, str):
                raise ConfigError(f"{here}: {choice!r} is not a registered auxiliary target (registered: "
                                  f"{', '.join(sorted(TARGETS))}; join several with +, none for no target)")
            if len(set(names)) != len(names):
                raise ConfigError(f"{here}: {choice!r} names a target twice")

    @property
    def target_chooser(self) -> Parameter | None:
        return next((p for p in self.parameters if p.set == TARGET_SET), None)

    @property
    def conditional(self) -> list[str]:
        """Parameters not in every trial (Optuna's GPSampler samples them at random)."""
        return [p.name for p in self.parameters if p.when or (p.target_weight and self.target_chooser)]

    # ---------------------------------------------------------------------------------------------------------
    # Values
    # ---------------------------------------------------------------------------------------------------------
    def _active(self, p: Parameter, values: dict[str, Any], base: PilotPlan) -> bool:
        if any(values.get(other, _MISSING) not in allowed for other, allowed in p.when.items()):
            return False
        if p.target_weight:
            chooser = self.target_chooser
            chosen = target_names(values[chooser.name]) if chooser and chooser.name in values else None
            return p.target_weight in (chosen if chosen is not None else base_targets(base, self.variant))
        return True

    def suggest(self, trial: optuna.Trial, base: PilotPlan) -> dict[str, Any]:
        """The trial's value of every parameter active in it, in the file's order (define-by-run)."""
        values: dict[str, Any] = {}
        for p in self.parameters:
            if self._active(p, values, base):
                values[p.name] = p.suggest(trial)
        return values

    def default_params(self, base: PilotPlan) -> dict[str, Any]:
        """The parameters' values in the default configuration (`base`: the plan of the budget's own settings)."""
        values: dict[str, Any] = {}
        for p in self.parameters:
            if not self._active(p, values, base):
                continue
            try:
                value = base_value(base, self.variant, p.set)
                if p.set == TARGET_SET:
                    value = "+".join(t["name"] for t in value) or NO_TARGET
                elif p.times:
                    unit = base_value(base, self.variant, p.times)
                    if not unit:
                        raise ConfigError(f"times: {p.times} is 0 in this budget, so no factor on it can give "
                                          f"{p.set}={value}")
                    value = value / unit
            except ConfigError as e:  # the first use of a parameter's settings: name the file and parameter
                raise ConfigError(f"{self.source}: parameter {p.name}: {e}") from None
            values[p.name] = value
        return values

    def with_default_choices(self, base: PilotPlan) -> SearchSpace:
        """This space with the default configuration's value added to any categorical lacking it, so that trial 0
        can evaluate the default (Optuna cannot fix a categorical to a value outside its choices)."""
        defaults, params = self.default_params(base), []
        for p in self.parameters:
            value = defaults.get(p.name, _MISSING)
            if p.type == "categorical" and value is not _MISSING and value not in p.choices:
                log.info("%s: added the default configuration's %r to the choices of %s", self.source, value, p.name)
                p = replace(p, choices=p.choices + (value,))
            params.append(p)
        return replace(self, parameters=tuple(params))

    def settings(self, values: dict[str, Any], base: PilotPlan) -> dict[str, Any]:
        """The settings (key -> value) that a trial's parameter `values` make, on the budget's own (`base`)."""
        out: dict[str, Any] = {}
        targets, weights = None, {}
        for p in self.parameters:
            if p.name not in values:
                continue
            value = values[p.name]
            if p.set == TARGET_SET:
                targets = target_names(value)
            elif p.target_weight:
                weights[p.target_weight] = float(value)
            else:
                if p.times:
                    value = value * base_value(base, self.variant, p.times)
                    if _is_int(base_value(base, self.variant, p.set)):
                        value = int(round(value))
                out[p.set] = value
        if targets is not None or weights:
            # Each target as the default configuration has it (its options: a teacher's layer), else plain.
            entries = {t["name"]: t for t in base_value(base, self.variant, TARGET_SET)}
            chosen = [entries.get(name, {"name": name, "weight": 1.0, "options": {}})
                      for name in (targets if targets is not None else entries)]
            out[TARGET_SET] = [{**t, "weight": weights.get(t["name"], t["weight"])} for t in chosen]
        return out

    def check(self, base: PilotPlan, make_plan: Callable[[dict[str, Any]], PilotPlan]) -> None:
        """Every parameter's extremes and choices, one at a time on the default configuration, made into plans:
        a setting that does not exist or a value a config refuses fails here, before any training."""
        defaults, chooser = self.default_params(base), self.target_chooser
        for p in self.parameters:
            for value in p.values_to_check():
                values = {**defaults, p.name: value}
                if p.target_weight and chooser:  # a set that holds the target, so that its weight counts
                    values[chooser.name] = next(c for c in chooser.choices if p.target_weight in target_names(c))
                values = {q.name: values[q.name] for q in self.parameters
                          if q.name in values and self._active(q, values, base)}
                try:
                    make_plan(self.settings(values, base))
                except ConfigError as e:
                    raise ConfigError(f"{self.source}: parameter {p.name} = {value!r}: {e}") from None


_MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def base_targets(base: PilotPlan, variant: str) -> list[str]:
    return [t["name"] for t in base_value(base, variant, TARGET_SET)]


def base_value(base: PilotPlan, variant: str, key: str) -> Any:
    """The value of setting `key` in the default configuration (`base`), read from its resolved run configs: the
    preset's value where the budget sets none."""
    head, _, rest = key.partition(".")
    if head in ("tokenizer", "diffusion") and rest:
        if key == TARGET_SET or _TARGET_WEIGHT.fullmatch(key):
            entries = to_dict(base.tokenizer_runs[variant][0].config.model.aux_targets)
            if key == TARGET_SET:
                return entries
            name = _TARGET_WEIGHT.fullmatch(key).group(1)
            return next((t["weight"] for t in entries if t["name"] == name), 1.0)
        value = base.tokenizer_runs[variant][0].config if head == "tokenizer" else base.diffusion_runs[variant]
        for part in rest.split("."):
            if not hasattr(value, part):
                raise ConfigError(f"unknown setting {key!r} (no {part!r} in the {head} run config)")
            value = getattr(value, part)
        return value
    if key not in _BUDGET_FIELDS:
        raise ConfigError(f"unknown setting {key!r}")
    return getattr(base.settings, key)


def space_path(name: str | Path) -> Path:
    """A space file's path: a YAML path as given, or a name shipped in configs/sweep/ (maetok, vae)."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--space {name}: no such file")
        return path
    for root in (Path.cwd() / "configs" / "sweep", CONFIG_DIR / "sweep"):
        if (root / f"{name}.yaml").is_file():
            return root / f"{name}.yaml"
    shipped = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))
    raise ConfigError(f"--space {name}: not a YAML file, nor a space shipped in configs/sweep ({', '.join(shipped)})")


def load_space(name: str | Path) -> SearchSpace:
    path = space_path(name)
    return SearchSpace.from_dict(load_yaml(path), str(path))
