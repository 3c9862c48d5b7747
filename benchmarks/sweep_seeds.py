"""Does the sweep's best configuration beat the default beyond tokenizer-seed noise? Both rerun as MAETok pilots at
the standard budget with several tokenizer seeds (`train.seed`), gFID / rFID / probe reported as mean and spread.

    python benchmarks/sweep_seeds.py --sweep runs/sweep-cifar --out runs/sweep-seeds            # runs, resumable
    python benchmarks/sweep_seeds.py --sweep runs/sweep-cifar --out runs/sweep-seeds --collect  # the table only

The best configuration's settings come from the sweep's report.json. `--default-pilots DIR...` reads the default
configuration's seeds from finished pilots instead of running them (their maetok column is used).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import RESULTS_DIR, machine, markdown_table, utc_now, write_json
from maetok.pilot.budgets import as_overrides

# What the comparison reads from each pilot's report.json (the maetok column), lower-is-better flag.
KPIS = {"gfid[resnet56-cifar10]@2000 (nocfg)": True, "gfid[resnet56-cifar10]@2000 (cfg)": True,
        "rfid[resnet56-cifar10]@2000": True, "probe_top1@2000": False, "psnr@2000": False}
# What generating an image costs each configuration (set by its token count: the same for every seed).
COSTS = ("generation_gflops_per_image_nocfg", "generation_gflops_per_image_cfg")


def best_settings(sweep: Path) -> list[str]:
    """The best trial's tokenizer settings as --tokenizer-set KEY=VALUE arguments."""
    report = json.loads((sweep / "report.json").read_text())
    settings = report["best"][0]["settings"]  # a single objective: one best trial
    out = []
    for key, value in settings.items():
        run_key = key.removeprefix("tokenizer.")
        if run_key == key:
            raise SystemExit(f"{sweep}/report.json: setting {key} is not a tokenizer setting; this script reruns "
                             f"tokenizer settings only")
        out += ["--tokenizer-set", *as_overrides({run_key: value})]
    return out


def run_pilot(data: str, out: Path, settings: list[str], seed: int) -> None:
    command = [sys.executable, "-m", "maetok.cli", "pilot", "--data", data, "--budget", "standard",
               "--variants", "maetok", "--out", str(out), "--tokenizer-set", f"train.seed={seed}", *settings]
    if (out / "pilot_results.json").is_file():
        command.append("--resume")
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def read_maetok(pilot: Path, names) -> dict[str, float]:
    """The named metrics of the pilot's maetok column (report.json)."""
    report = json.loads((pilot / "report.json").read_text())
    return {name: report["maetok"][name] for name in names}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "n": len(values)}


def verdict(best: dict, default: dict, lower: bool) -> str:
    """Best minus default, and whether it clears twice the standard error of that difference (Welch)."""
    diff = best["mean"] - default["mean"]
    se = math.sqrt(best["sd"] ** 2 / best["n"] + default["sd"] ** 2 / default["n"])
    better = diff < 0 if lower else diff > 0
    beyond = abs(diff) > 2 * se
    word = ("best ahead" if better else "default ahead") + (" beyond" if beyond else " within")
    return f"{diff:+.3g} (2 SE {2 * se:.2g}): {word} seed noise"


def plot_seeds(result: dict, path: Path) -> None:
    """Each seed's value and the mean ± sd per configuration, one panel per KPI: the spread is the yardstick."""
    names = [n for n in KPIS if n != "psnr@2000"]
    fig = Figure(figsize=(3.2 * len(names), 3.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for x, which in enumerate(("default", "best")):
            values, stats = result[name][which]["per_seed"], result[name][which]
            ax.scatter([x] * len(values), values, color=f"C{x}", alpha=0.6)
            ax.errorbar(x + 0.15, stats["mean"], yerr=stats["sd"], fmt="s", color=f"C{x}", capsize=4)
        ax.set_xticks([0, 1], ["default", "sweep's best"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_title(name.replace("[resnet56-cifar10]@2000", "") + (" (lower is better)" if KPIS[name] else ""),
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def copy_reports(pilots: dict[str, list[Path]], dest: Path) -> dict[str, list[str]]:
    """Each pilot's report (markdown and JSON) under dest/<configuration>-<n>/, so the table can be traced."""
    copied = {}
    for which, dirs in pilots.items():
        copied[which] = []
        for n, pilot in enumerate(dirs):
            folder = dest / f"{which}-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("report.md", "report.json"):
                shutil.copyfile(pilot / name, folder / name)
            copied[which].append(folder.name)
    return copied


def collect(pilots: dict[str, list[Path]], dest: Path, sweep: Path) -> None:
    kpis = {which: [read_maetok(p, KPIS) for p in dirs] for which, dirs in pilots.items()}
    costs = {which: read_maetok(dirs[0], COSTS) for which, dirs in pilots.items()}
    rows, result = [], {}
    for name, lower in KPIS.items():
        stats = {which: summary([k[name] for k in runs]) for which, runs in kpis.items()}
        result[name] = {which: {**stats[which], "per_seed": [k[name] for k in kpis[which]]} for which in kpis}
        result[name]["best_minus_default"] = verdict(stats["best"], stats["default"], lower)
        rows.append([name, *(f"{stats[w]['mean']:.4g} ± {stats[w]['sd']:.2g} "
                             f"({', '.join(f'{v:.4g}' for v in result[name][w]['per_seed'])})"
                             for w in ("default", "best")), result[name]["best_minus_default"]])
    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / "sweep-seeds.json", {"kpis": result, "pilots": {w: [str(p) for p in d] for w, d in
                                                                      pilots.items()},
                                           "costs": costs, "reports": copy_reports(pilots, dest),
                                           "best_settings": best_settings(sweep), "machine": machine(),
                                           "date": utc_now()})
    plot_seeds(result, dest / "sweep-seeds.png")
    table = markdown_table(["metric", "default: mean ± sd (per seed)", "sweep's best: mean ± sd (per seed)",
                            "best - default"], rows)
    (dest / "sweep-seeds.md").write_text(
        "# The sweep's best configuration vs the default, 3 tokenizer seeds each (standard budget, CIFAR-10)\n\n"
        f"{table}\n\nGeneration GFLOPs per image (SiT forwards + decode; without / with CFG): default "
        f"{costs['default'][COSTS[0]]:.3f} / {costs['default'][COSTS[1]]:.3f}, sweep's best "
        f"{costs['best'][COSTS[0]]:.3f} / {costs['best'][COSTS[1]]:.3f}.\n\n'Beyond' means the difference of the "
        "means exceeds twice its standard error (Welch, n = 3 per side: a rough test).\n")
    print(f"wrote {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, required=True, help="the sweep's --out (its report.json)")
    parser.add_argument("--data", default="zip:../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep-seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--default-pilots", type=Path, nargs="*", default=None,
                        help="finished pilots of the default configuration, one per seed, instead of running them")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "sweep-seeds")
    parser.add_argument("--collect", action="store_true", help="only read the finished pilots and write the table")
    args = parser.parse_args(argv)
    pilots = {"best": [args.out / f"best-seed{s}" for s in args.seeds],
              "default": args.default_pilots or [args.out / f"default-seed{s}" for s in args.seeds]}
    if not args.collect:
        settings = best_settings(args.sweep)
        for seed, pilot in zip(args.seeds, pilots["best"]):
            run_pilot(args.data, pilot, settings, seed)
        if not args.default_pilots:
            for seed, pilot in zip(args.seeds, pilots["default"]):
                run_pilot(args.data, pilot, [], seed)
    collect(pilots, args.results, args.sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
