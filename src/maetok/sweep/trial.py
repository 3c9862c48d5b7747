"""One trial of a sweep: its parameters made into a pilot plan, run fidelity by fidelity in its own folder.

    architecture  the models built from the trial's configs: parameters and GFLOPs. A constraint on them that
                  fails prunes the trial before any training.
    latent        the pilot up to its latent stages; the proxy KPI is reported to Optuna, and its pruner may stop
                  the trial here
    full          the same pilot folder continued through the diffusion stages to gFID

A trial's folder is named by a hash of its settings: a retried trial (its worker died) and any later trial with
the same settings resume the pilot there, reusing every finished stage.

Under torchrun rank 0 runs Optuna and sends each pilot it starts to the other ranks (`follow`), which run it
with it, as one DDP job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch
from filelock import FileLock

from ..config import to_dict
from ..io.distributed import DistInfo, all_gather_list
from ..pilot import PilotInterrupted, PilotPlan, open_pilot_data, pilot_settings, run_plan
from ..pilot.budgets import as_overrides
from ..pilot.evaluation import architecture_cost, pilot_feature_net
from .config import SweepConfig
from .kpis import KPIS, architecture_kpis, oriented, pilot_kpis
from .space import SearchSpace
from .study import retry_trial, worker_identity

log = logging.getLogger("maetok.sweep")


def share_command(command: dict | None, dist: DistInfo) -> dict | None:
    """Rank 0's `command` on every rank (None: the sweep is over)."""
    if not dist.enabled:
        return command
    return all_gather_list([command] if dist.is_main else [], dist)[0]


def follow(dist: DistInfo, collective_timeout: float | None) -> None:
    """A rank other than 0: run every pilot rank 0 starts, with it, until it says the sweep is over."""
    while (command := share_command(None, dist)) is not None:
        plan = PilotPlan.from_dict(command["plan"])
        try:
            run_plan(plan, resume=True, fidelity=command["fidelity"], collective_timeout=collective_timeout)
        except PilotInterrupted:
            raise
        except Exception:  # noqa: BLE001  (rank 0 records the trial as failed; this rank waits for the next)
            log.exception("rank %d: trial in %s failed", dist.rank, plan.out)


def trial_key(plan_inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan_inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


class TrialRunner:
    """What every trial of one sweep shares (the request, the space, the default configuration's plan), and
    the objective Optuna calls."""

    def __init__(self, config: SweepConfig, dist: DistInfo):
        self.config, self.dist = config, dist
        settings = pilot_settings(config.budget, config.overrides, config.tokenizer_set, config.diffusion_set)
        self.data = open_pilot_data(config.data, settings)
        # The default configuration: the budget's own values of every parameter.
        self.base = PilotPlan(config.data, [config.variant], config.budget, settings, config.out / "trials" / "base",
                              self.data.facts, config.device, config.inception)
        self.base.check_fits(dist.world)
        self.space: SearchSpace = config.search_space.with_default_choices(self.base)
        self.space.check(self.base, self.plan_for)
        self.release_lock = lambda: None     # set by the trial loop: the sweep's lock, held while Optuna asks
        self.interrupted: BaseException | None = None

    def plan_for(self, settings: dict[str, Any]) -> PilotPlan:
        """The pilot plan of a trial's settings (key -> value, from SearchSpace.settings), in its own folder."""
        runs: dict[str, dict[str, Any]] = {"tokenizer": {}, "diffusion": {}, "budget": {}}
        for key, value in settings.items():
            head, _, rest = key.partition(".")
            if head in ("tokenizer", "diffusion"):
                runs[head][rest] = value
            else:
                runs["budget"][key] = value
        config = self.config
        # After the sweep's own settings: a trial's value wins, as a later --tokenizer-set does.
        budget = pilot_settings(config.budget, config.overrides + as_overrides(runs["budget"]),
                                config.tokenizer_set + as_overrides(runs["tokenizer"]),
                                config.diffusion_set + as_overrides(runs["diffusion"]))
        key = trial_key({"data": config.data, "variant": config.variant, "budget": config.budget,
                         "settings": to_dict(budget), "inception": config.inception})
        plan = replace(self.base, settings=budget, out=self.config.out / "trials" / key)
        plan.check_fits(self.dist.world)
        return plan

    def prepare_feature_net(self) -> None:
        """The network every trial's FIDs embed with, made once in the sweep's folder (trials with their own
        would not compare): the pretrained one where the data has one, else a small CNN trained here. Call it
        under the sweep's lock."""
        pilot_feature_net(replace(self.base, out=self.config.out), self.data, self.dist.device)

    # ---------------------------------------------------------------------------------------------------------
    # The objective
    # ---------------------------------------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float | list[float]:
        # Before anything else: a worker killed from here on leaves a trial that names it, to be retried.
        trial.set_user_attr("worker", worker_identity())
        self.release_lock()  # Optuna has made this trial: other workers may ask for theirs
        if trial.user_attrs.get("fail_reason"):  # copied from the trial this one retries
            trial.set_user_attr("fail_reason", None)
        try:
            return self._evaluate(trial)
        except optuna.TrialPruned:
            raise
        except (PilotInterrupted, KeyboardInterrupt) as e:
            self.interrupted = e
            trial.set_user_attr("fail_reason", f"interrupted ({str(e) or type(e).__name__}); retried")
            retry_trial(trial.study, next(t for t in trial.study.get_trials(deepcopy=False)
                                          if t.number == trial.number))
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
            raise

    def _evaluate(self, trial: optuna.Trial) -> float | list[float]:
        config = self.config
        values = self.space.suggest(trial, self.base)
        settings = self.space.settings(values, self.base)
        plan = self.plan_for(settings)
        trial.set_user_attr("settings", settings)
        trial.set_user_attr("folder", str(plan.out.relative_to(config.out)))
        if self.dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dist.device)  # the trial's peak, not the worker's
        kpis = architecture_kpis(architecture_cost(plan, config.variant))
        self._record(trial, kpis, {}, "architecture")
        broken = [c for c in config.constraint_list if c.kpi in kpis and c.value(kpis) > 0]
        if broken:
            self._prune(trial, kpis, "infeasible before training: " +
                        ", ".join(f"{c.kpi}={kpis[c.kpi]:.4g} breaks {c}" for c in broken))
        # One process at a time in a folder: two workers given the same settings take turns, the second reusing.
        with FileLock(plan.out.with_suffix(".lock")):
            self._seed_feature_net(plan.out)
            kpis = self._run(trial, plan, "latent", kpis)
            if config.full_fidelity:
                if config.prunes:
                    self._maybe_prune(trial, kpis)
                kpis = self._run(trial, plan, "full", kpis)
        self._constrain(trial, kpis)
        missing = [name for name in config.objectives if not math.isfinite(kpis.get(name, math.nan))]
        if missing:  # said here: Optuna would fail the trial without naming the KPI
            raise ValueError(f"the trial's pilot gave no finite {', '.join(missing)} "
                             f"({', '.join(f'{n}={kpis.get(n)}' for n in missing)})")
        objective = [kpis[name] for name in config.objectives]
        return objective[0] if len(objective) == 1 else objective

    def _maybe_prune(self, trial: optuna.Trial, kpis: dict[str, float]) -> None:
        proxy = self.config.proxy
        direction = KPIS[self.config.objectives[0]].direction
        trial.report(oriented(kpis[proxy], proxy, direction), step=1)
        if trial.should_prune():
            self._prune(trial, kpis, f"{proxy}={kpis[proxy]:.4g} at the latent fidelity: the pruner stopped it "
                                     f"before the diffusion stages")

    def _prune(self, trial: optuna.Trial, kpis: dict[str, float], reason: str) -> None:
        """Stop the trial as pruned, with its constraints so far and the reason (Optuna keeps no message)."""
        self._constrain(trial, kpis)
        trial.set_user_attr("pruned_because", reason)
        raise optuna.TrialPruned(reason)

    def _seed_feature_net(self, folder: Path) -> None:
        shared = self.config.out / "feature_net"
        if shared.is_dir() and not (folder / "feature_net").exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copytree(shared, folder / "feature_net")

    def _run(self, trial: optuna.Trial, plan: PilotPlan, fidelity: str, kpis: dict[str, float]) -> dict[str, float]:
        """The trial's pilot continued to `fidelity` (every rank), and the KPIs it then has."""
        share_command({"plan": plan.to_dict(), "fidelity": fidelity}, self.dist)
        run_plan(plan, resume=True, fidelity=fidelity, collective_timeout=self.config.collective_timeout)
        measured, sources = pilot_kpis(json.loads((plan.out / "report.json").read_text()), self.config.variant)
        kpis = {**kpis, **measured}
        self._record(trial, kpis, sources, fidelity)
        return kpis

    @staticmethod
    def _record(trial: optuna.Trial, kpis: dict[str, float], sources: dict[str, str], fidelity: str) -> None:
        trial.set_user_attr("kpis", kpis)
        trial.set_user_attr("fidelity", fidelity)
        if sources:
            trial.set_user_attr("metric_names", sources)

    def _constrain(self, trial: optuna.Trial, kpis: dict[str, float]) -> None:
        """Optuna's constraints (feasible at <= 0) of those the trial's KPIs so far decide."""
        for constraint in self.config.constraint_list:
            if constraint.kpi in kpis:
                trial.set_constraint(str(constraint), constraint.value(kpis))
