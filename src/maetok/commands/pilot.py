"""`maetok pilot` and `maetok demo`: the whole comparison, and its quick run on the built-in shapes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..demo import run_demo
from ..io.distributed import resolve_device
from ..pilot import PilotInterrupted, pilot_settings, run_pilot
from ..pilot.target_sets import with_target_sets
from .common import out_folder
from .training import resume_request


def cmd_pilot(args: argparse.Namespace) -> int:
    out_folder(args.out, "pilots")
    resume, overrides = resume_request(args)  # an override right after a bare --resume is an override
    settings = pilot_settings(args.budget, overrides, args.tokenizer_set, args.diffusion_set)
    # Each set of --target-sets takes maetok's place; its target names are checked by run_pilot, once a resumed
    # pilot's plugins are loaded again.
    variants = with_target_sets(args.variants.split(","), args.target_sets)
    try:
        report = run_pilot(args.data, variants, args.budget, Path(args.out), resume=resume,
                           force=args.force, device=resolve_device(args.device), inception=args.inception,
                           settings=settings, collective_timeout=args.collective_timeout)
    except PilotInterrupted as e:
        print(f"maetok: pilot interrupted: {e}", file=sys.stderr)
        return e.exit_code
    if report is not None:  # None on ranks other than 0 under torchrun
        print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out_folder(args.out, "pilots")
    try:
        run_demo(Path(args.out), budget=args.budget, force=args.force)
    except PilotInterrupted as e:
        print(f"maetok: demo interrupted: {e}", file=sys.stderr)
        return e.exit_code
    return 0
