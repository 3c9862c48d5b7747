"""Tokenizer learning-rate sweep under a pilot budget: the evidence behind the rates the budgets use.

For each variant and rate, the pilot's own tokenizer runs (MAETok: stage 1, then decoder fine-tuning at the same
rate) are trained on the pilot's data and scored on its held-out set: rFID under the pilot's feature network,
PSNR and SSIM. Everything else is the budget's; only `train.optim.lr` changes.

    python benchmarks/lr_sweep.py --budget quick --lrs 1e-3 2e-3 5e-3 1e-2 --out runs/lr-sweep-quick
    python benchmarks/lr_sweep.py --data zip:../shared/data/cifar10-jpeg.zip --budget standard \\
        --lrs 8e-4 2e-3 4e-3 --out runs/lr-sweep-standard
    # writes OUT/lr_sweep.json, lr_sweep.md and lr_sweep.png; re-running skips the runs the JSON records and
    # resumes an interrupted one from its checkpoints

Budget fields take dotted overrides at the end (e.g. `tokenizer_steps=300` for a shorter sweep). A rate at which
training diverges (too many non-finite steps in a row) is recorded as such and the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import machine, machine_line, markdown_table, utc_now, write_json
from maetok.io.distributed import DistInfo
from maetok.io.pretrained import load_tokenizer
from maetok.pilot import PilotPlan, open_pilot_data, pilot_settings
from maetok.pilot.evaluation import FeatureSpace, evaluate_reconstruction, pilot_feature_net
from maetok.pilot.stages import open_variant_results, train_tokenizer
from maetok.train.run import setup_logging

METRICS = ("rfid", "psnr", "ssim")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="shapes", help="data spec, as for `maetok pilot` (default: built-in shapes)")
    ap.add_argument("--budget", default="quick")
    ap.add_argument("--variants", nargs="+", default=["ae", "vae", "maetok"])
    ap.add_argument("--lrs", nargs="+", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("overrides", nargs="*", help="budget fields, e.g. tokenizer_steps=300")
    args = ap.parse_args(argv)
    setup_logging(None)
    results_path = args.out / "lr_sweep.json"
    settings = {"data": args.data, "budget": args.budget, "overrides": args.overrides}
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if previous and previous.get("settings") != settings:
        raise SystemExit(f"{args.out} holds a sweep with other settings ({previous.get('settings')}); use a new --out")
    args.out.mkdir(parents=True, exist_ok=True)
    # One feature network and one held-out reference for every run: a shared plan in --out holds them.
    budget = pilot_settings(args.budget, args.overrides)
    data = open_pilot_data(args.data, budget)
    base = PilotPlan(args.data, args.variants, args.budget, budget, args.out, data.facts, device=args.device)
    dist = DistInfo(device=torch.device(args.device))
    space = FeatureSpace(pilot_feature_net(base, data, dist.device)[0], base, data, dist)
    result = {"machine": machine(args.device), "date": utc_now(), "settings": settings,
              # the rate the budget's own runs use (its setting, else the preset's)
              "budget_lr": base.tokenizer_runs[args.variants[0]][0].config.train.optim.lr,
              "runs": previous.get("runs", {})}
    for variant in args.variants:
        for lr in args.lrs:
            key = f"{variant}@{lr:g}"
            if key in result["runs"]:
                continue  # measured already (or diverged: resuming it would only diverge again)
            plan = PilotPlan.from_budget(args.budget, args.data, [variant], args.out / key, data.facts,
                                         overrides=args.overrides, tokenizer_set=[f"train.optim.lr={lr}"],
                                         device=args.device)
            run_results = open_variant_results(plan, variant, dist)
            runs = plan.tokenizer_runs[variant]  # MAETok: stage 1, then decoder fine-tuning at the same rate
            try:
                for run in runs:
                    if run_results.pending(run.stage):
                        trained = train_tokenizer(run.config, plan.out / variant / run.folder, dist)
                        run_results.record(run.stage, trained)
            except FloatingPointError as e:  # too high a rate: the finding, not a failure of the sweep
                print(f"{key}: diverged ({e})", file=sys.stderr)
                result["runs"][key] = {"variant": variant, "lr": lr, "diverged": True}
                write_json(results_path, result)
                continue
            tok = load_tokenizer(plan.tokenizer_dir(variant) / "model")
            if run_results.pending("reconstruction"):
                run_results.record("reconstruction", evaluate_reconstruction(plan, variant, tok, data, space, dist))
            train_wall_s = sum(run_results.stages[run.stage].get("wall_s", 0.0) for run in runs)
            result["runs"][key] = {"variant": variant, "lr": lr, **_pick(run_results.stages["reconstruction"]),
                                   "train_wall_s": train_wall_s}
            write_json(results_path, result)  # after every run: an interrupted sweep keeps what it measured
    md = markdown(result, args.variants)
    (args.out / "lr_sweep.md").write_text(md + "\n")
    plot(result, args.variants, args.out / "lr_sweep.png")
    print(md)
    return 0


def _pick(recon: dict) -> dict:
    """rFID / PSNR / SSIM from a pilot reconstruction record (whose keys carry the feature net and counts)."""
    out = {}
    for k, v in recon.items():
        if k.startswith("rfid[") and "inception" not in k:
            out["rfid"], out["rfid_key"] = v, k
        elif k.startswith("psnr@"):
            out["psnr"] = v
        elif k.startswith("ssim@"):
            out["ssim"] = v
    return out


def markdown(result: dict, variants: list[str]) -> str:
    runs = result["runs"]
    lrs = sorted({r["lr"] for r in runs.values()})
    rows = []
    for v in variants:
        mine = {r["lr"]: r for r in runs.values() if r["variant"] == v}
        scored = [r for r in mine.values() if not r.get("diverged") and math.isfinite(r["rfid"])]
        best = min(scored, key=lambda r: r["rfid"])["lr"] if scored else None
        for lr in lrs:
            if lr not in mine:
                continue
            r = mine[lr]
            if r.get("diverged"):
                rows.append([v, f"{lr:g}", "diverged", "", "", ""])
                continue
            mark = " (best rFID)" if lr == best else ""
            rows.append([v, f"{lr:g}{mark}", f"{r['rfid']:.2f}", f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
                         f"{r['train_wall_s']:.0f}"])
    s = result["settings"]
    key = next((r["rfid_key"] for r in runs.values() if "rfid_key" in r), "rfid")
    return "\n".join([machine_line(result["machine"]), "",
                      f"Tokenizer learning-rate sweep on `{s['data']}`, `{s['budget']}` budget"
                      + (f" with {' '.join(s['overrides'])}" if s["overrides"] else "")
                      + f"; the budget uses lr {result['budget_lr']:g}. rFID is `{key}`; PSNR / SSIM on the same "
                        "held-out images. One seed per run.", "",
                      markdown_table(["variant", "lr", "rFID", "PSNR (dB)", "SSIM", "train s"], rows)])


def plot(result: dict, variants: list[str], path: Path) -> None:
    fig = Figure(figsize=(8, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, (metric, label) in enumerate((("rfid", "rFID (lower is better)"), ("psnr", "PSNR dB (higher is better)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for v in variants:
            pts = sorted((r["lr"], r[metric]) for r in result["runs"].values() if r["variant"] == v
                         and not r.get("diverged") and math.isfinite(r[metric]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        ax.axvline(result["budget_lr"], color="gray", linestyle=":", label="budget's lr")
        ax.set_xscale("log")
        lrs = sorted({r["lr"] for r in result["runs"].values()})
        ax.minorticks_off()  # label the swept rates only: log-axis minor labels overlap
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("tokenizer learning rate")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
