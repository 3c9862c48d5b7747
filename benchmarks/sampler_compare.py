"""Does Bayesian optimisation find a better tokenizer in fewer trials than random search? Optuna's GP sampler and
its RandomSampler, 3 sampler seeds each, on a cheap objective that still responds to the settings: the rFID of a
MAETok trained briefly on CIFAR-10 (the sweep's latent fidelity only, no diffusion stage, about a minute a trial
on one CPU core).

    python benchmarks/sampler_compare.py --data zip:../shared/data/cifar10-jpeg.zip --out runs/sampler-compare
    # then: --collect writes benchmarks/results/sampler-compare (JSON, table, plot)

Every study shares one --out folder: a trial's pilot lives in a folder named by its settings, so a configuration
proposed by two studies (the default configuration, queued first in each) is trained once. Re-running resumes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib
import optuna

from common import RESULTS_DIR, machine, markdown_table, utc_now, write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SAMPLERS = ("gp", "random")
# The quick budget cut to about a minute a trial: a fifth of its tokenizer steps, fewer images, a two-K GMM.
CHEAP_BUDGET = ["n_train=2000", "n_eval=500", "tokenizer_steps=300", "decoder_ft_steps=50", "gmm_ks=[1,4]",
                "analysis_max_train=2000", "classifier_steps=0"]
SPACE = Path(__file__).resolve().parent / "sweep" / "maetok-cifar.yaml"


def study_name(sampler: str, seed: int) -> str:
    return f"{sampler}-seed{seed}"


def run_studies(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        for sampler in SAMPLERS:
            command = [sys.executable, "-m", "maetok.cli", "sweep", "--data", args.data, "--space", str(SPACE),
                       "--budget", "quick", "--trials", str(args.trials), "--objective", "rfid",
                       "--sampler", sampler, "--pruner", "none", "--seed", str(seed), "--out", str(args.out),
                       "--study", study_name(sampler, seed), *CHEAP_BUDGET]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)


def best_so_far(values: list[float]) -> list[float]:
    best, out = float("inf"), []
    for value in values:
        best = min(best, value)
        out.append(best)
    return out


def collect(args: argparse.Namespace) -> None:
    storage = f"sqlite:///{(args.out / 'study.db').resolve()}"
    curves: dict[str, list[list[float]]] = {sampler: [] for sampler in SAMPLERS}
    for sampler in SAMPLERS:
        for seed in args.seeds:
            study = optuna.load_study(study_name=study_name(sampler, seed), storage=storage)
            done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
            done.sort(key=lambda t: t.number)
            curves[sampler].append(best_so_far([t.value for t in done][:args.trials]))
    length = min(len(curve) for runs in curves.values() for curve in runs)
    rows, summary = [], {}
    for sampler, runs in curves.items():
        per_trial = [[curve[i] for curve in runs] for i in range(length)]
        summary[sampler] = {"best_so_far_per_seed": [curve[:length] for curve in runs],
                            "mean": [statistics.mean(v) for v in per_trial],
                            "min": [min(v) for v in per_trial], "max": [max(v) for v in per_trial]}
    for i in range(length):
        rows.append([i + 1] + [f"{summary[s]['mean'][i]:.3f} ({summary[s]['min'][i]:.2f}-{summary[s]['max'][i]:.2f})"
                               for s in SAMPLERS])
    dest = RESULTS_DIR / "sampler-compare"
    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / "sampler-compare.json", {
        "objective": "rfid[resnet56-cifar10]@500 (minimise), latent fidelity", "budget": "quick",
        "budget_overrides": CHEAP_BUDGET, "space": SPACE.name, "seeds": args.seeds, "trials": length,
        "samplers": summary, "machine": machine(), "date": utc_now()})
    table = markdown_table(["trials", *(f"{s}: best rFID, mean (range) over seeds" for s in SAMPLERS)], rows)
    (dest / "sampler-compare.md").write_text(
        f"# GP-BO vs random search: best rFID found vs number of trials\n\n{len(args.seeds)} sampler seeds each; "
        f"the first trial of every study is the default configuration.\n\n{table}\n")
    figure, axes = plt.subplots(figsize=(6, 4))
    for sampler, colour in zip(SAMPLERS, ("tab:blue", "tab:orange")):
        steps = range(1, length + 1)
        for curve in summary[sampler]["best_so_far_per_seed"]:
            axes.plot(steps, curve, color=colour, alpha=0.3, linewidth=1)
        axes.plot(steps, summary[sampler]["mean"], color=colour, linewidth=2, label=f"{sampler} (mean of seeds)")
    axes.set_xlabel("trials")
    axes.set_ylabel("best rFID so far (lower is better)")
    axes.set_title("GP Bayesian optimisation vs random search")
    axes.legend()
    figure.tight_layout()
    figure.savefig(dest / "best-vs-trials.png", dpi=120)
    print(f"wrote {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zip:../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--out", type=Path, default=Path("runs/sampler-compare"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--collect", action="store_true", help="only read the studies and write the results")
    args = parser.parse_args(argv)
    if not args.collect:
        run_studies(args)
    collect(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
