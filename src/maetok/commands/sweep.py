"""`maetok sweep`: Bayesian optimisation of a tokenizer's settings on your data (see `maetok.sweep`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..io.distributed import resolve_device
from ..pilot import PilotInterrupted
from .common import CLIError, out_folder


def cmd_sweep(args: argparse.Namespace) -> int:
    out_folder(args.out, "sweeps")
    try:
        # Optuna is an optional dependency (the sweep extra): only this command needs it.
        from ..sweep import SweepConfig, run_sweep
    except ModuleNotFoundError as e:
        raise CLIError(f"maetok sweep needs Optuna ({e}); install it with pip install 'maetok[sweep]'") from None
    config = SweepConfig(
        data=args.data, space=args.space, out=Path(args.out), trials=args.trials, budget=args.budget,
        objectives=[args.objective], proxy=args.proxy, constraints=args.constraint, sampler=args.sampler,
        pruner=args.pruner, seed=args.seed, storage=args.storage, study=args.study, overrides=args.overrides,
        tokenizer_set=args.tokenizer_set, diffusion_set=args.diffusion_set, device=resolve_device(args.device),
        inception=args.inception, heartbeat_s=args.heartbeat, collective_timeout=args.collective_timeout)
    try:
        report = run_sweep(config, worker=args.worker)
    except PilotInterrupted as e:
        print(f"maetok: sweep interrupted: {e}; run the same command again to continue", file=sys.stderr)
        return e.exit_code
    if report is not None:
        print(f"report: {report}")
    return 0
