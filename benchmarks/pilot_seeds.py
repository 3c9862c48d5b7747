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
from pathlib import Path

from common import markdown_table, write_json
from maetok.io.pretrained import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    from maetok.config import from_dict
    from maetok.pilot import Pilot, PilotBudget, _train_run
    from maetok.train.run import run_diffusion, setup_logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pilot", type=Path, required=True, help="a finished pilot's directory")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="diffusion training seeds besides 0")
    args = ap.parse_args(argv)
    plan_path = args.pilot / "pilot_results.json"
    if not plan_path.is_file():
        raise SystemExit(f"{args.pilot}: no pilot_results.json; run the pilot first")
    plan = json.loads(plan_path.read_text())["plan"]
    setup_logging(None)
    pilot = Pilot(plan["data"], plan["variants"], plan["budget"], args.pilot,
                  settings=from_dict(PilotBudget, plan["settings"]))
    pilot.open_data()
    pilot.build_feature_net()
    pilot.set_reference()
    out = args.pilot / "seeds"
    results_path = out / "seeds.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for variant in plan["variants"]:
        own = json.loads((args.pilot / variant / "results.json").read_text())
        per_seed = results.setdefault(variant, {})
        per_seed["0"] = {name: _gfid(own[f"generation_{name}"]) for name in ("nocfg", "cfg")}
        tok_dir = pilot.tokenizer_dir(variant)
        tok = load_tokenizer(tok_dir / "model")
        for seed in args.seeds:
            if str(seed) in per_seed:
                continue
            run = out / f"{variant}-seed{seed}"
            dcfg = pilot.diffusion_config(args.pilot / variant, tok.config, tok_dir, [f"train.seed={seed}"])
            _train_run(run_diffusion, dcfg, run / "diffusion", pilot.dist, pilot.device)
            per_seed[str(seed)] = {name: _gfid(pilot.eval_generation(run, tok, dcfg, scale, run / f"samples-{name}"))
                                   for name, scale in (("nocfg", 1.0), ("cfg", pilot.b.cfg_scale))}
            write_json(results_path, results)  # after every seed: an interrupted run keeps what it measured
    write_json(results_path, results)
    md = markdown(results, plan)
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
