"""Where a sweep's trials live, and what keeps several workers and a killed sweep right.

Storages (Optuna's): a SQLite file in the sweep's folder by default; any SQLAlchemy URL (PostgreSQL, MySQL) for
workers on several machines; `journal:FILE` (Optuna's journal storage: a log file on a shared filesystem). The
sweep's folder (`--out`) holds every trial's pilot and the shared feature network, so all workers must see it
too (a shared filesystem).

A killed worker leaves its trial RUNNING. Two things fail and retry it (Optuna's RetryHeartbeatStaleTrialCallback:
a new trial with the same parameters, whose pilot resumes the killed one's folder, so nothing trains twice):
- on the RDB storages, Optuna's heartbeat, for a worker on any machine, once it has been silent for the grace
  period;
- on every storage, at once, a worker on the same machine that finds the process gone (the journal storage has
  no heartbeat in Optuna).
A trial whose workers died MAX_RETRY + 1 times (an out-of-memory kill each time?) stays failed, with its reason.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from ..config import ConfigError
from .config import SweepConfig, check_same_request
from .kpis import KPIS
from .space import SearchSpace

log = logging.getLogger("maetok.sweep")

HEARTBEAT_GRACE = 4         # a trial silent for this many heartbeats is stale: a busy database may delay one
MAX_RETRY = 2
PRUNER_STARTUP = 3          # trials completed before the median pruner compares: the default and two more
RECORD = "maetok_sweep"     # the study's user attribute that keeps the request (SweepConfig.record)


def storage_url(storage: str | None, out: Path) -> str:
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


def shown_url(url: str) -> str:
    """The URL with its password hidden (it goes into logs and the report)."""
    if url.startswith("journal:") or "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (a URL SQLAlchemy cannot parse: shown without the part after '@')
        return url.split("@")[-1]


def open_storage(url: str, heartbeat_s: int) -> BaseStorage:
    """The storage `url` names, opened (tables created); one line naming the problem when it cannot be."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"--storage {url}: folder {path.parent} does not exist")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise ConfigError(f"--storage {url}: cannot open the journal file ({e})") from None
    if "://" not in url:
        raise ConfigError(f"--storage {url!r}: give a database URL (sqlite:///FILE, postgresql://USER@HOST/DB, "
                          f"mysql://...) or journal:FILE on a shared filesystem")
    # SQLite: a writer waits for another worker's write instead of failing at once ("database is locked").
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                          grace_period=HEARTBEAT_GRACE * heartbeat_s,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as e:  # noqa: BLE001  (drivers raise their own types: each becomes the one line below)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (install the database's driver, e.g. pip install psycopg2-binary for PostgreSQL)" \
            if isinstance(e, ImportError) else ""
        raise ConfigError(f"--storage {shown_url(url)}: cannot open it: {type(e).__name__}: {first}{hint}") from None


def open_study(storage: BaseStorage, config: SweepConfig, space: SearchSpace, defaults: dict[str, Any],
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The sweep's study, made (with the default configuration queued as its first trial) or joined. Call it
    under the sweep's lock: two workers starting together must not both queue the default."""
    name = config.study_name
    directions = [KPIS[o].direction for o in config.objectives]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True,
                                pruner=pruner)
    now = json.loads(json.dumps(config.record(space)))
    recorded = study.user_attrs.get(RECORD)
    if recorded is None and study.trials:
        raise ConfigError(f"study {name!r} in {shown_url(storage_url(config.storage, config.out))} holds trials "
                          f"and is not a maetok sweep; choose another --study")
    check_same_request(recorded, now, name)
    if recorded is None:
        study.set_user_attr(RECORD, now)
    if not any(t.user_attrs.get("default") for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(defaults, user_attrs={"default": True})
    return study


def trial_seed(seed: int, trials_so_far: int) -> int:
    """The sampler's seed for the study's next trial: a pure function of the sweep's --seed and the trials it holds
    (a resumed sweep proposes what an uninterrupted one would), hashed so that the streams of two --seed values
    are unrelated (seed + trials_so_far would make --seed 1 repeat --seed 0's proposals one trial later)."""
    return int(np.random.SeedSequence([seed, trials_so_far]).generate_state(1)[0])


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler `name`, seeded. Random trials first: Optuna's 10, or half of a shorter sweep."""
    startup = min(10, max(1, trials // 2))
    if name == "gp":
        # Conditional parameters are sampled at random by GPSampler (it models the parameters every trial has);
        # the sweep says so once at the start rather than per trial.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    if name == "tpe":
        # group: TPE models each set of parameters that occur together (the conditional ones included);
        # constant_liar: parallel workers do not all propose the same point.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                          constant_liar=True, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP)
    if name == "hyperband":
        # The pilot has one intermediate point (the latent fidelity): one rung, keeping the best third.
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


# ------------------------------------------------------------------------------------------------------------
# Workers and their trials
# ------------------------------------------------------------------------------------------------------------
def _start_ticks(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot), to tell it from a later one with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid())}


def worker_gone(worker: dict[str, Any]) -> bool:
    """Whether the process that ran a trial on this machine has ended (another machine's cannot be told here)."""
    if worker.get("host") != socket.gethostname() or not isinstance(worker.get("pid"), int):
        return False
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    started = worker.get("pid_start")
    return started is not None and _start_ticks(worker["pid"]) != started


def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue `trial` again (same parameters) unless it ran MAX_RETRY + 1 times; whether it was queued."""
    if len(trial.system_attrs.get("retry_history", [])) >= MAX_RETRY:
        return False
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
    return True


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail, with its reason, and retry every RUNNING trial whose worker on this machine has ended. Call it under
    the sweep's lock (two workers must not both retry one trial)."""
    # Optuna has no public call to write to a trial that another process started: its storage takes them.
    storage = study._storage
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not worker or not worker_gone(worker):
            continue
        runs = len(trial.system_attrs.get("retry_history", [])) + 1
        reason = (f"its worker (pid {worker['pid']} on {worker['host']}) ended while it ran, without a word (killed: "
                  f"SIGKILL, the out-of-memory killer?); " +
                  ("retried" if runs <= MAX_RETRY else f"not retried: it was run {runs} times"))
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # the heartbeat failed it first, and retried it
            continue
        retry_trial(study, storage.get_trial(trial._trial_id))
        log.warning("trial %d: %s", trial.number, reason)
        recovered.append(trial.number)
    return recovered


@dataclass
class Counts:
    finished: int   # complete, pruned, or failed and not retried
    running: int
    waiting: int    # queued: the default configuration, retries


def count_trials(study: optuna.Study) -> Counts:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or
                   (t.state == TrialState.FAIL and t.number not in retried) for t in trials)
    return Counts(finished, sum(t.state == TrialState.RUNNING for t in trials),
                  sum(t.state == TrialState.WAITING for t in trials))


def has_heartbeat(storage: BaseStorage) -> bool:
    return isinstance(storage, RDBStorage) and storage.heartbeat_interval is not None
