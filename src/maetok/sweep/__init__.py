"""`maetok sweep`: Bayesian optimisation (Optuna) of a tokenizer's settings on your data, each trial a pilot.

    config   the request as one typed value (`SweepConfig`)
    space    the search space file: parameters, the settings they set, conditions (`SearchSpace`, `load_space`)
    kpis     what a trial measures, its direction and fidelity; objectives, proxy and constraints
    study    storages, the study, samplers and pruners, killed workers' trials failed and retried
    trial    one trial: a pilot plan run fidelity by fidelity (architecture, latent, full) in its own folder
    run      `run_sweep`: the trial loop of one process (alone, a worker, or a torchrun job)
    report   report.md, report.json and the PNGs
"""
from .config import SweepConfig
from .kpis import KPIS
from .run import run_sweep
from .space import SearchSpace, load_space

__all__ = ["KPIS", "SearchSpace", "SweepConfig", "load_space", "run_sweep"]
