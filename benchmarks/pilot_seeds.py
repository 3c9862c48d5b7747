"""How much of a pilot's gFID gap is diffusion-training noise? Retrain a finished pilot's diffusion stage with
other seeds (its tokenizers, latents and evaluation set are reused) and report gFID per seed, mean and spread.

    python benchmarks/pilot_seeds.py --pilot runs/pilot-cifar-standard --seeds 1 2
    # writes <pilot>/seeds/seeds.json and seeds.md (the pilot's own run is seed 0); re-running skips done seeds

Only the diffusion model's training seed changes (the sampling noise stays the pilot's), so the spread measured
is that of diffusion training, not of tokenizer training.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from common import markdown_table, write_json
from maetok.config import from_dict
from maetok.io.distributed import DistInfo
from maetok.io.pretrained import load_tokenizer
from maetok.pilot import PilotBudget, PilotPlan, open_pilot_data
from maetok.pilot.budgets import recorded_settings, with_settings
from maetok.pilot.evaluation import FeatureSpace, evaluate_generation, pilot_feature_net
from maetok.pilot.stages import train_diffusion
from maetok.train.run import setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pilot", type=Path, required=True, help="a finished pilot's directory")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="diffusion training seeds besides 0")
    args = ap.parse_args(argv)
    plan_path = args.pilot / "pilot_results.json"
    if not plan_path.is_file():
        raise SystemExit(f"{args.pilot}: no pilot_results.json; run the pilot first")
    recorded = json.loads(plan_path.read_text())["plan"]
    setup_logging(None)
    settings = from_dict(PilotBudget, recorded_settings(recorded["settings"]))
    data = open_pilot_data(recorded["data"], settings)
    plan = PilotPlan(recorded["data"], recorded["variants"], recorded["budget"], settings, args.pilot, data.facts)
    dist = DistInfo()
    space = FeatureSpace(pilot_feature_net(plan, data, dist.device)[0], plan, data, dist)
    out = args.pilot / "seeds"
    results_path = out / "seeds.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for variant in plan.variants:
        own = json.loads((args.pilot / variant / "results.json").read_text())
        per_seed = results.setdefault(variant, {})
        per_seed["0"] = {name: _gfid(own[f"generation_{name}"]) for name in plan.sampling}
        tok = load_tokenizer(plan.tokenizer_dir(variant) / "model")
        for seed in args.seeds:
            if str(seed) in per_seed:
                continue
            run = out / f"{variant}-seed{seed}"
            seeded = replace(settings, diffusion=with_settings(settings.diffusion, [f"train.seed={seed}"]))
            config = PilotPlan(plan.data, [variant], plan.budget, seeded, plan.out, plan.facts).diffusion_runs[variant]
            train_diffusion(config, run / "diffusion", dist)
            per_seed[str(seed)] = {name: _gfid(evaluate_generation(plan, run, name, tok, space, dist))
                                   for name in plan.sampling}
            write_json(results_path, results)  # after every seed: an interrupted run keeps what it measured
    write_json(results_path, results)
    md = markdown(results, recorded)
    (out / "seeds.md").write_text(md + "\n")
    print(md)
    return 0


def _gfid(metrics: dict) -> float:
    return next(v for k, v in metrics.items() if k.startswith("gfid[") and "inception" not in k)


def markdown(results: dict, plan: dict) -> str:
    rows = []
    for variant, per_seed in results.items():
        for name in ("nocfg", "cfg"):
            values = [per_seed[s][name] for s in sorted(per_seed, key=int)]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            rows.append([variant, name, " / ".join(f"{v:.2f}" for v in values), f"{statistics.mean(values):.2f}",
                         f"{spread:.2f}"])
    seeds = sorted({s for per_seed in results.values() for s in per_seed}, key=int)
    return "\n".join([f"gFID of `{plan['data']}` ({plan['budget']} budget) per diffusion training seed "
                      f"({', '.join(seeds)}; tokenizers, latents and sampling noise fixed).", "",
                      markdown_table(["variant", "CFG", "gFID per seed", "mean", "std"], rows)])


if __name__ == "__main__":
    sys.exit(main())
