"""A sweep's request as one typed value: the data, the space, the budget, what to optimise, how to search."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, check_seed
from ..pilot.budgets import check_budget
from .kpis import DEFAULT_PROXY, Constraint, check_proxy, needs_full, parse_objectives
from .space import SearchSpace, load_space

SAMPLERS = ("gp", "tpe", "random")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class SweepConfig:
    """`maetok sweep` in Python: `run_sweep(SweepConfig(data="shapes", space="maetok", out=Path("runs/sweep")))`."""
    data: str
    space: str | Path | SearchSpace     # a YAML path, a name shipped in configs/sweep (maetok, vae), or parsed
    out: Path
    trials: int = 20                    # finished trials (complete, pruned, failed), the default's included
    budget: str = "quick"
    objectives: list[str] = field(default_factory=lambda: ["gfid"])
    proxy: str = DEFAULT_PROXY          # what the pruner sees at the latent fidelity (one objective only)
    constraints: list[str] = field(default_factory=list)   # "generation_gflops<=2.5"
    sampler: str = "gp"
    pruner: str = "median"
    seed: int = 0
    storage: str | None = None          # default: sqlite:///OUT/study.db
    study: str | None = None            # default: the name of `out`
    overrides: list[str] = field(default_factory=list)       # budget fields, as `maetok pilot` takes them
    tokenizer_set: list[str] = field(default_factory=list)
    diffusion_set: list[str] = field(default_factory=list)
    device: str = "cpu"
    inception: bool = False
    heartbeat_s: int = 60               # RDB storages: a trial silent for 4x this long is failed and retried
    collective_timeout: float | None = None
    constraint_list: list[Constraint] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Everything checked that can be without the data: one line naming the problem."""
        self.out = Path(self.out).expanduser()
        if self.trials < 1:
            raise ConfigError(f"--trials {self.trials}: a sweep needs at least one trial")
        check_budget(self.budget)
        self.objectives = parse_objectives(self.objectives)
        check_proxy(self.proxy)
        self.constraint_list = [Constraint.parse(c) for c in self.constraints]
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}; choose one of {', '.join(PRUNERS)}")
        check_seed(self.seed, "--seed")
        if self.heartbeat_s < 1:
            raise ConfigError(f"--heartbeat {self.heartbeat_s}: must be at least 1 second")
        if not isinstance(self.space, SearchSpace):
            self.space = load_space(self.space)

    @property
    def search_space(self) -> SearchSpace:
        assert isinstance(self.space, SearchSpace)
        return self.space

    @property
    def variant(self) -> str:
        return self.search_space.variant

    @property
    def full_fidelity(self) -> bool:
        """Whether trials go on to the diffusion stage (an objective or a constraint needs gFID)."""
        return needs_full(self.objectives + [c.kpi for c in self.constraint_list])

    @property
    def prunes(self) -> bool:
        """Optuna prunes single-objective studies only (its pruners compare one intermediate value)."""
        return self.full_fidelity and len(self.objectives) == 1 and self.pruner != "none"

    @property
    def study_name(self) -> str:
        return self.study or self.out.resolve().name

    def record(self, space: SearchSpace) -> dict[str, Any]:
        """What a study keeps of the request (`space`: the one its trials use), to refuse a process that asks
        for another; JSON values. The folder, storage, trial count, device and timeouts may differ."""
        return {"data": self.data, "space": space.to_dict(), "budget": self.budget, "objectives": self.objectives,
                "proxy": self.proxy, "constraints": [str(c) for c in self.constraint_list], "sampler": self.sampler,
                "pruner": self.pruner, "seed": self.seed, "overrides": list(self.overrides),
                "tokenizer_set": list(self.tokenizer_set), "diffusion_set": list(self.diffusion_set),
                "inception": self.inception}


def check_same_request(recorded: dict[str, Any] | None, now: dict[str, Any], study: str) -> None:
    """A worker or a resumed sweep must ask for what the study was started with: otherwise its trials would not
    compare with the others'."""
    if not recorded:
        return
    diff = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} before, {now.get(k)!r} now" for k in diff)
        raise ConfigError(f"study {study!r} was started with other settings ({shown}); use the same ones, or "
                          f"another --out / --study")
