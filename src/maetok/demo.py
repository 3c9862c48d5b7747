"""The CPU demo (the README's main command): the quick pilot on the built-in shapes data.

AE, VAE and MAETok tokenizers trained under one small budget, the same diffusion model on each, and one report
(`runs/pilot-quick/report.md`) with metrics, grids and plots. About 10 minutes on 2 CPU cores. Re-running
continues an interrupted demo and reuses finished stages.
"""
from __future__ import annotations

from pathlib import Path

from .pilot import run_pilot


def run_demo(out: Path, budget: str = "quick", force: bool = False) -> Path:
    report = run_pilot("shapes", ["ae", "vae", "maetok"], budget, Path(out), resume=not force, force=force)
    print(f"\nDemo finished. Report: {report}\nPictures and per-variant runs are under {Path(out)}/")
    return report
