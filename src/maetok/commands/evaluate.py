"""`maetok eval gen|recon` and `maetok analyze`: the evaluation API's commands, printing their results."""
from __future__ import annotations

import argparse
import json
import sys

from ..eval.api import analyze_command, evaluate_command
from .common import finished_output


def cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate_command(args)
    if result is not None:  # None on ranks other than 0 under torchrun
        print(json.dumps(result, indent=2))
        if result.get("json"):
            print(f"maetok: wrote {result['json']}", file=sys.stderr)  # stdout stays one JSON document
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    finished_output(args.out, ("analysis.json", "gmm_nll.png"), "analysis results", args.force)
    print(json.dumps(analyze_command(args), indent=2))
    return 0
