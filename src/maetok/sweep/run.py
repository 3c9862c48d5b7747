"""`run_sweep`: Bayesian optimisation of a tokenizer's settings, each trial a pilot of one variant.

    run_sweep(SweepConfig(data="shapes", space="maetok", out=Path("runs/sweep"), trials=20, budget="quick"))

Every process of a sweep (the first, more `worker=True` ones on any machine, each alone or a torchrun job) runs
trials until the study holds `trials` finished ones; the first then writes the report (`maetok.sweep.report`).
A killed sweep run again continues: finished trials are kept, the trial that was running is retried in its
folder (see `maetok.sweep.study`).
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from datetime import timedelta
from pathlib import Path

import optuna
import torch
from filelock import FileLock

from ..config import ConfigError
from ..io.distributed import cleanup, init_distributed
from ..pilot import PILOT_COLLECTIVE_TIMEOUT
from ..train.run import setup_logging
from .config import SweepConfig
from .report import write_sweep_report
from .study import (count_trials, has_heartbeat, make_pruner, make_sampler, open_storage, open_study,
                    recover_dead_trials, shown_url, storage_url, trial_seed)
from .trial import TrialRunner, follow, share_command

log = logging.getLogger("maetok.sweep")


def run_sweep(config: SweepConfig, worker: bool = False, sampler: optuna.samplers.BaseSampler | None = None,
              pruner: optuna.pruners.BasePruner | None = None) -> Path | None:
    """Run (or join, or continue) the sweep; the report's path, or None on a worker and on ranks other than 0.
    `sampler` / `pruner`: Optuna objects in place of `config.sampler` / `config.pruner` (a given sampler is used
    as it is; by name, it is seeded again before each trial, so that a resumed sweep asks what an uninterrupted
    one would)."""
    timeout = PILOT_COLLECTIVE_TIMEOUT if config.collective_timeout is None else \
        timedelta(seconds=config.collective_timeout)
    dist = init_distributed(config.device, timeout=timeout)
    if not dist.enabled:
        dist.device = torch.device(config.device)
    try:
        setup_logging(None, dist.is_main)
        with warnings.catch_warnings():
            # Heartbeats, retries, GPSampler with constraints and TPE's group are marked experimental in Optuna.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            runner = TrialRunner(config, dist)  # the data and the space checked: bad input fails before training
            if not dist.is_main:
                follow(dist, config.collective_timeout)
                return None
            try:
                return _lead(config, runner, worker, sampler, pruner)
            finally:
                share_command(None, dist)  # the other ranks stop following
    finally:
        cleanup(dist)


def _lead(config: SweepConfig, runner: TrialRunner, worker: bool, sampler, pruner) -> Path | None:
    url = storage_url(config.storage, config.out)
    created = not config.out.exists()
    config.out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(config.out / "sweep.lock")
    with lock:  # workers starting together: one creates the storage's tables and queues the default
        try:
            storage = open_storage(url, config.heartbeat_s)
            study = open_study(storage, config, runner.space, runner.space.default_params(runner.base),
                               pruner or make_pruner(config.pruner))
        except ConfigError:
            if created:  # it holds our lock file at most: a refused sweep leaves nothing behind
                shutil.rmtree(config.out, ignore_errors=True)
            raise
        runner.prepare_feature_net()
    log.info("sweep %s: %d trials of %s on %s, %s; storage %s", config.study_name, config.trials, config.variant,
             config.data, " and ".join(config.objectives), shown_url(url))
    if config.sampler == "gp" and sampler is None and runner.space.conditional:
        log.info("GPSampler models the parameters every trial has; it samples %s at random (--sampler tpe models "
                 "them too)", ", ".join(runner.space.conditional))
    run_trials(study, runner, lock, config, sampler)
    if worker:
        return None
    while has_heartbeat(storage) and wait_for_others(study, lock, config):
        run_trials(study, runner, lock, config, sampler)  # what a dead worker left: its trial's retry
    with lock:
        return write_sweep_report(study, config, runner, url)


def run_trials(study: optuna.Study, runner: TrialRunner, lock: FileLock, config: SweepConfig,
               sampler: optuna.samplers.BaseSampler | None) -> None:
    """Trials, one at a time, until the study's finished and running ones make `config.trials`. The lock is held
    from the count until Optuna has made the trial (the objective releases it): workers never overshoot."""
    runner.release_lock = lambda: lock.release() if lock.is_locked else None
    while True:
        lock.acquire()
        try:
            recover_dead_trials(study)
            counts = count_trials(study)
            if counts.finished + counts.running >= config.trials:
                log.info("sweep %s: %d trials finished, %d running elsewhere: this process has no trial left to "
                         "start", config.study_name, counts.finished, counts.running)
                return
            # Seeded by the trial's place in the study (the storage keeps no sampler state): the same trials so far
            # give the same next proposal, in this process or in a sweep run again.
            total = len(study.get_trials(deepcopy=False))
            study.sampler = sampler or make_sampler(config.sampler, trial_seed(config.seed, total), config.trials)
            study.optimize(runner.objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        finally:
            runner.release_lock()
        if runner.interrupted is not None:
            raise runner.interrupted


def wait_for_others(study: optuna.Study, lock: FileLock, config: SweepConfig) -> bool:
    """Wait until no trial runs on another worker (finished, or failed by the heartbeat when its worker died),
    so that the report covers every trial; whether trials are left to run (a dead worker's retry)."""
    announced = False
    while True:
        with lock:
            recover_dead_trials(study)
            optuna.storages.fail_stale_trials(study)
            counts = count_trials(study)
        if counts.running == 0:
            return counts.finished < config.trials
        if not announced:
            log.info("waiting for %d trial(s) running on other workers before writing the report", counts.running)
            announced = True
        time.sleep(min(10, config.heartbeat_s))
