"""`maetok weights check|fetch`: the pretrained networks a preset needs, whether they are here, and their download.

    maetok weights fetch --preset maetok-b-128      # on a machine with internet access, before a cluster job
    maetok weights check --preset maetok-b-128      # on the cluster: what is here (exit code 2 if anything is not)
    maetok weights check                            # every network maetok knows
    maetok weights fetch --name vgg16 --name inception-is-head

What a preset needs is `maetok.io.weights.required_weights` of its config, the list a training run checks before it
reads any data, so the two cannot disagree.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import TokenizerRunConfig, load_config
from ..io.weights import WEIGHTS, Needed, locate_all, missing_error, required_weights, weights_named


def selected_weights(args: argparse.Namespace) -> list[Needed]:
    """The preset's networks (with its overrides) and those named; with neither, every downloadable or packaged
    network (the CIFAR ResNets live in the shared data folder, which these commands do not manage)."""
    needed = []
    if args.preset or args.overrides:
        needed += required_weights(load_config(TokenizerRunConfig, args.preset, args.overrides))
    needed += [Needed(weights_named(name), used_by="--name") for name in args.name]
    if not (args.preset or args.overrides or args.name):
        needed = [Needed(w) for w in WEIGHTS.values() if w.fetchable or w.package_file]
    return needed


def cmd_weights(args: argparse.Namespace) -> int:
    needed = selected_weights(args)
    if not needed:
        print(f"{args.preset or 'this config'} needs no pretrained networks")
        return 0
    fetch = args.action == "fetch"
    # Printed as each network is found or downloaded (minutes for the large ones), so widths are set up front.
    name_width = max(len(item.weights.name) for item in needed)
    use_width = max(len(item.used_by or item.weights.what) for item in needed)
    print(f"{'status':<18} {'network':<{name_width}} {'used by':<{use_width}} file, or why not")

    def report(item: Needed, path: Path | None, why_not: str) -> None:
        status = "ready" if path is not None else "missing" + (" (optional)" if item.optional else "")
        print(f"{status:<18} {item.weights.name:<{name_width}} {item.used_by or item.weights.what:<{use_width}} "
              f"{path or why_not.removeprefix(item.weights.what + ': ')}", flush=True)

    _, problems = locate_all(needed, allow_download=fetch, report=report)
    required = [(item, error) for item, error in problems if not item.optional]
    if required:  # why each one is missing is in its row above
        raise missing_error(required, args.preset, brief=True)
    print(f"all {len(needed)} pretrained networks are here" + (" (fetched where they were not)" if fetch else ""))
    return 0
