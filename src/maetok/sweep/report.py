"""The sweep's report: the best trial(s) next to the default configuration, with every KPI and the fidelity it
comes from; the optimisation history; what mattered (Optuna's fANOVA importances); the Pareto front for several
objectives; every trial; and the commands that go on from here (the best as a full pilot, more workers, the
dashboard). Writes report.md, report.json and PNGs into the sweep's folder.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial, TrialState

from ..pilot.budgets import as_overrides, with_settings
from .config import SweepConfig
from .kpis import FIDELITIES, KPIS
from .study import HEARTBEAT_GRACE, shown_url
from .trial import TrialRunner

# With fewer complete trials the forest behind fANOVA has nothing to split: it gives every parameter the same share.
IMPORTANCE_MIN_TRIALS = 3
FIDELITY_NOTE = ("Fidelities: **architecture** = from the trial's configs before any training (parameters, "
                 "GFLOPs); **latent** = its pilot through the latent stages (tokenizer training, reconstruction, "
                 "latent caches, latent analysis); **full** = the same pilot continued through diffusion training "
                 "and sampling (gFID). A pruned trial stopped at the fidelity its row names.")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v.get('name')}×{v.get('weight'):.3g}" if isinstance(v, dict) else _fmt(v)
                               for v in value) + "]"
    return "" if value is None else str(value)


def feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def best_trials(study: optuna.Study, config: SweepConfig) -> list[FrozenTrial]:
    """One objective: the best feasible complete trial; several: the feasible Pareto front (Optuna's)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    if not complete:
        return []
    if len(config.objectives) > 1:
        return sorted(study.best_trials, key=lambda t: t.values[0])
    sign = 1 if KPIS[config.objectives[0]].direction == "minimize" else -1
    return [min(complete, key=lambda t: sign * t.value)]


def default_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The default configuration's trial (its latest attempt when a worker died under it)."""
    return next((t for t in reversed(trials) if t.user_attrs.get("default") and t.state != TrialState.FAIL),
                next((t for t in trials if t.user_attrs.get("default")), None))


def importances(study: optuna.Study, config: SweepConfig) -> dict[str, dict[str, float] | str]:
    """fANOVA importance of each parameter for each objective; or why there is none (too few trials)."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete < IMPORTANCE_MIN_TRIALS:
        why = f"not computed: {complete} complete trial(s), fANOVA needs {IMPORTANCE_MIN_TRIALS} at least"
        return {name: why for name in config.objectives}
    out: dict[str, dict[str, float] | str] = {}
    for i, name in enumerate(config.objectives):
        target = None if len(config.objectives) == 1 else (lambda t, i=i: t.values[i])
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=config.seed)
            out[name] = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
        except (ValueError, RuntimeError) as e:
            out[name] = f"not computed: {e}"
    return out


def _note(trial: FrozenTrial, retried_as: dict[int, int]) -> str:
    if trial.state == TrialState.PRUNED:
        return trial.user_attrs.get("pruned_because", "pruned")
    if trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get("fail_reason") or (
            "no heartbeat: its worker stopped while it ran" if trial.number in retried_as else "failed")
        return reason + (f" (retried as #{retried_as[trial.number]})" if trial.number in retried_as else "")
    if trial.state == TrialState.RUNNING:
        worker = trial.user_attrs.get("worker", {})
        return f"running (pid {worker.get('pid')} on {worker.get('host')})"
    if trial.state == TrialState.WAITING:
        return "queued, not run yet: a retry, or the default; run the sweep again to run it"
    return "" if feasible(trial) else "infeasible: " + ", ".join(k for k, v in trial.constraints.items() if v > 0)


def shown_kpis(config: SweepConfig, trials: list[FrozenTrial]) -> list[str]:
    wanted = [*config.objectives, config.proxy, *(c.kpi for c in config.constraint_list), "gfid", "rfid", "psnr",
              "probe", "gmm_nll", "generation_gflops"]
    present = {k for t in trials for k in t.user_attrs.get("kpis", {})}
    return [k for k in dict.fromkeys(wanted) if k in present]


def trial_record(trial: FrozenTrial) -> dict[str, Any]:
    return {"number": trial.number, "state": trial.state.name, "fidelity": trial.user_attrs.get("fidelity"),
            "values": trial.values, "params": trial.params, "settings": trial.user_attrs.get("settings"),
            "kpis": trial.user_attrs.get("kpis", {}), "metric_names": trial.user_attrs.get("metric_names", {}),
            "constraints": trial.constraints, "intermediate": trial.intermediate_values,
            "folder": trial.user_attrs.get("folder"), "default": bool(trial.user_attrs.get("default")),
            "note": trial.user_attrs.get("pruned_because") or trial.user_attrs.get("fail_reason")}


# ------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------
def pilot_command(config: SweepConfig, settings: dict[str, Any]) -> str:
    """`maetok pilot` with the sweep's settings and a trial's (which win): its configuration as a full pilot."""
    runs = {head: {k.partition(".")[2]: v for k, v in settings.items() if k.startswith(head + ".")}
            for head in ("tokenizer", "diffusion")}
    fields = {k: v for k, v in settings.items() if not k.startswith(("tokenizer.", "diffusion."))}
    args = ["maetok", "pilot", "--data", config.data, "--budget", config.budget, "--variants", config.variant,
            "--out", str(config.out / "best-pilot")] + (["--inception"] if config.inception else [])
    for head in ("tokenizer", "diffusion"):
        for text in as_overrides({**with_settings({}, getattr(config, f"{head}_set")), **runs[head]}):
            args += [f"--{head}-set", text]
    return shlex.join(args + as_overrides({**with_settings({}, config.overrides), **fields}))


def sweep_command(config: SweepConfig, url: str) -> str:
    """The command a worker on another machine runs to join this sweep."""
    args = ["maetok", "sweep", "--data", config.data, "--space", config.search_space.source,
            "--trials", str(config.trials), "--budget", config.budget, "--out", str(config.out.resolve()),
            "--objective", ",".join(config.objectives), "--proxy", config.proxy, "--sampler", config.sampler,
            "--pruner", config.pruner, "--seed", str(config.seed), "--storage", shown_url(url),
            "--study", config.study_name]
    for constraint in config.constraint_list:
        args += ["--constraint", str(constraint)]
    for head in ("tokenizer", "diffusion"):
        for text in getattr(config, f"{head}_set"):
            args += [f"--{head}-set", text]
    return shlex.join(args + (["--inception"] if config.inception else []) + ["--worker"] + config.overrides)


# ------------------------------------------------------------------------------------------------------------
# Pictures (Optuna's matplotlib plots)
# ------------------------------------------------------------------------------------------------------------
def _save(axes, path: Path) -> str:
    figure = axes.figure
    figure.set_size_inches(7, 4.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def plot_all(study: optuna.Study, config: SweepConfig, found: dict, out: Path) -> dict[str, str]:
    """history-<objective>.png, importances-<objective>.png, pareto_front.png: those that can be drawn."""
    pictures: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return pictures
    several = len(config.objectives) > 1
    for i, name in enumerate(config.objectives):
        target = (lambda t, i=i: t.values[i]) if several else None
        axes = optuna.visualization.matplotlib.plot_optimization_history(study, target=target, target_name=name)
        pictures[f"history {name}"] = _save(axes, out / f"history-{name}.png")
        if isinstance(found.get(name), dict) and found[name]:
            figure, axes = plt.subplots()
            params = list(found[name])[::-1]
            axes.barh(params, [found[name][p] for p in params])
            axes.set_xlabel(f"fANOVA importance for {name}")
            pictures[f"importances {name}"] = _save(axes, out / f"importances-{name}.png")
    if len(config.objectives) in (2, 3):
        axes = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=config.objectives)
        pictures["pareto front"] = _save(axes, out / "pareto_front.png")
    return pictures


# ------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------
def _comparison(config: SweepConfig, default: FrozenTrial | None, best: FrozenTrial, runner: TrialRunner) -> list[str]:
    kpis = {k for t in (default, best) if t is not None for k in t.user_attrs.get("kpis", {})}
    order = [*config.objectives, *(k for k in KPIS if k not in config.objectives)]
    names = {**(default.user_attrs.get("metric_names", {}) if default else {}), **best.user_attrs.get("metric_names", {})}
    head = f"default (#{default.number}, {default.state.name.lower()})" if default else "default (not run)"
    lines = [f"| KPI | fidelity | read from | {head} | best (#{best.number}) |", "|---|---|---|---|---|"]
    for k in order:
        if k in kpis:
            d = default.user_attrs.get("kpis", {}).get(k) if default else None
            lines.append(f"| {k}{' (objective)' if k in config.objectives else ''} | {KPIS[k].fidelity} | "
                         f"{names.get(k, KPIS[k].what)} | {_fmt(d)} | {_fmt(best.user_attrs['kpis'].get(k))} |")
    defaults = runner.space.default_params(runner.base)
    lines += ["", "| parameter | sets | default | best |", "|---|---|---|---|"]
    for p in runner.space.parameters:
        lines.append(f"| {p.name} | {p.set}{f' (× {p.times})' if p.times else ''} | {_fmt(defaults.get(p.name))} | "
                     f"{_fmt(best.params.get(p.name))} |")
    return lines


def _best_section(config: SweepConfig, best: list[FrozenTrial], default: FrozenTrial | None,
                  runner: TrialRunner) -> list[str]:
    if not best:
        return ["## Best configuration", "", "No trial completed with its constraints met, so there is no best "
                "configuration yet; see the trials below (pruned ones stopped at the latent fidelity).", ""]
    lines = ["## Best configuration" if len(best) == 1 else "## Pareto front", ""]
    if len(best) > 1:
        lines += [f"{len(best)} trials that no other beats on every objective ({', '.join(config.objectives)}):",
                  "", "| # | " + " | ".join(config.objectives) + " | parameters |",
                  "|---|" + "---|" * len(config.objectives) + "---|"]
        lines += [f"| {t.number} | " + " | ".join(_fmt(v) for v in t.values) + " | " +
                  ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) + " |" for t in best]
        lines += ["", "![Pareto front](pareto_front.png)", "", f"The first of them (best {config.objectives[0]}):", ""]
    lines += _comparison(config, default, best[0], runner)
    others = ",".join(v for v in ("ae", "vae", "maetok") if v != config.variant)
    lines += ["", f"The same configuration as a full pilot (add `{others}` to `--variants` to compare it with the "
              "other tokenizers at these settings; at another `--budget`, note that factors such as the learning "
              "rate's were resolved at this one):",
              "", "```", pilot_command(config, best[0].user_attrs.get("settings", {})), "```", ""]
    return lines


def _trials_table(config: SweepConfig, trials: list[FrozenTrial]) -> list[str]:
    kpis = shown_kpis(config, trials)
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    lines = ["## Every trial", "", "| # | state | fidelity | " + " | ".join(kpis) + " | parameters | folder | note |",
             "|---|---|---|" + "---|" * len(kpis) + "---|---|---|"]
    for t in trials:
        values = t.user_attrs.get("kpis", {})
        lines.append(f"| {t.number}{' (default)' if t.user_attrs.get('default') else ''} | {t.state.name.lower()} | "
                     f"{t.user_attrs.get('fidelity', '')} | " + " | ".join(_fmt(values.get(k)) for k in kpis) +
                     " | " + ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) +
                     f" | {t.user_attrs.get('folder', '')} | {_note(t, retried_as)} |")
    return lines + [""]


def _setup_lines(config: SweepConfig, trials: list[FrozenTrial], url: str) -> list[str]:
    states = {s: sum(t.state == s for t in trials) for s in TrialState}
    counts = ", ".join(f"{n} {s.name.lower()}" for s, n in states.items() if n)
    objectives = ", ".join(f"{o} ({KPIS[o].direction}, {KPIS[o].fidelity} fidelity)" for o in config.objectives)
    if config.prunes:
        pruning = (f"Pruner: {config.pruner}, on {config.proxy} at the latent fidelity (turned to the objective's "
                   f"direction).")
    elif config.full_fidelity:
        pruning = "No pruning: Optuna prunes single-objective studies only; every trial runs to the full fidelity."
    else:
        pruning = "No pruning: every objective comes from the latent stages, no trial trains a diffusion model."
    constraints = ", ".join(map(str, config.constraint_list)) or "none"
    return [f"{len(trials)} trials ({counts}) for {config.trials} asked. Objective: {objectives}.",
            f"Search: Optuna's {config.sampler} sampler, seed {config.seed}; the default configuration is trial #0. "
            f"{pruning}", f"Constraints: {constraints}. Storage: `{shown_url(url)}`, study `{config.study_name}`.",
            "", FIDELITY_NOTE, ""]


def write_sweep_report(study: optuna.Study, config: SweepConfig, runner: TrialRunner, url: str) -> Path:
    out = config.out
    trials = study.get_trials(deepcopy=False)
    best, default = best_trials(study, config), default_trial(trials)
    found = importances(study, config)
    with matplotlib.rc_context():  # Optuna's plots set a style for the whole process: undone after them
        pictures = plot_all(study, config, found, out)
    report = {"study": config.study_name, "storage": shown_url(url), "request": config.record(runner.space),
              "trials_asked": config.trials, "kpis": {k: vars(v) for k, v in KPIS.items()},
              "fidelities": list(FIDELITIES), "best": [trial_record(t) for t in best],
              "default": trial_record(default) if default else None, "importances": found,
              "pictures": pictures, "trials": [trial_record(t) for t in trials],
              "rerun_best": pilot_command(config, best[0].user_attrs.get("settings", {})) if best else None}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# maetok sweep: {config.variant} on `{config.data}` ({config.budget} budget)", ""]
    lines += _setup_lines(config, trials, url)
    lines += _best_section(config, best, default, runner)
    lines += ["## Optimisation history", ""]
    lines += [f"![{k}]({v})" for k, v in pictures.items() if k.startswith("history")] or ["No trial completed yet."]
    lines += ["", "## What mattered (fANOVA parameter importances)", ""]
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    lines += [f"From the {complete} complete trials (pruned and failed ones have no objective value); with a "
              f"handful of trials these are noise.", ""]
    for name, values in found.items():
        lines += [f"- {name}: " + (", ".join(f"{p} {v:.2f}" for p, v in values.items())
                                   if isinstance(values, dict) else values)]
    lines += [f"![{k}]({v})" for k, v in pictures.items() if k.startswith("importances")]
    lines += [""] + _trials_table(config, trials)
    lines += ["## Going on", "", "More trials: run the same command with a larger `--trials`; finished trials are "
              "kept. A worker on another machine (the storage and this folder must be reachable from it: a "
              "PostgreSQL URL or `journal:FILE` on a shared filesystem, not a SQLite file):", "", "```",
              sweep_command(config, url), "```", "",
              f"Browse the study: `pip install optuna-dashboard && optuna-dashboard "
              f"{shown_url(url).removeprefix('journal:')}`.",
              f"A worker that dies leaves its trial running until it is failed and retried: at once by a worker "
              f"on the same machine; by the heartbeat after {HEARTBEAT_GRACE * config.heartbeat_s} s on a database "
              f"storage.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
