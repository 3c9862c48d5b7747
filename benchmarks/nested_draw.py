"""How nested token dropout should draw k, over tokenizer seeds: uniformly from `model.token_counts`, or keeping
all L tokens for half the samples (`model.token_full_prob=0.5`). Each run is a MAETok pilot (HOG target, k in
8/16/24/32) at the standard budget stopped at its latent KPIs (no diffusion model); the table gives rFID and PSNR
from the first k tokens per draw and seed.

    python benchmarks/nested_draw.py --draw uniform --seed 1 --out runs/nested-draw    # one run; resumable
    python benchmarks/nested_draw.py --draw full50 --seed 1 --out runs/nested-draw
    python benchmarks/nested_draw.py --collect uniform-seed0=runs/pilot-nested full50-seed0=runs/pilot-nested-full50 \\
        uniform-seed1=runs/nested-draw/uniform-seed1 full50-seed1=runs/nested-draw/full50-seed1

Full pilots (benchmarks/cheaper_generation.sh) serve as well: only their tokenizer stages and reconstruction are read.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import RESULTS_DIR, machine, markdown_table, utc_now, write_json
from maetok.pilot import pilot_settings, run_pilot
from maetok.pilot.target_sets import with_target_sets

NESTED = ["model.token_dropout=nested", "model.token_counts=[8,16,24,32]"]
DRAWS = {"uniform": [], "full50": ["model.token_full_prob=0.5"]}
VARIANT_DIR = "maetok-hog"


def run(draw: str, seed: int, data: str, out: Path) -> None:
    """One latent-fidelity pilot of `draw` at tokenizer seed `seed` in out/<draw>-seed<seed> (resumed if there)."""
    folder = out / f"{draw}-seed{seed}"
    settings = pilot_settings("standard", [], [*NESTED, *DRAWS[draw], f"train.seed={seed}"], [])
    run_pilot(data, with_target_sets(["maetok"], "hog"), "standard", folder, resume=folder.exists(),
              settings=settings, fidelity="latent")


def read_curve(pilot: Path) -> dict[int, dict[str, float]]:
    """rFID and PSNR per prefix length k, the full length from the pilot's main reconstruction."""
    results = json.loads((pilot / VARIANT_DIR / "results.json").read_text())
    full, prefix = results["reconstruction"], results["prefix_reconstruction"]

    def pick(prefix_of_name: str) -> float:  # the metric's name carries its feature net and sample count
        return next(v for k, v in full.items() if k.startswith(prefix_of_name))

    curve = {k: {"rfid": r, "psnr": p} for k, r, p in zip(prefix["tokens"], prefix["rfid"], prefix["psnr"])}
    stage = next(d for d in (pilot / VARIANT_DIR / "tokenizer-ft", pilot / VARIANT_DIR / "tokenizer") if d.is_dir())
    length = json.loads((stage / "model" / "config.json").read_text())["config"]["latent_tokens"]
    curve[length] = {"rfid": pick("rfid["), "psnr": pick("psnr@")}
    return curve


def collect(pilots: dict[str, Path], dest: Path) -> None:
    curves = {name: read_curve(folder) for name, folder in pilots.items()}
    ks = sorted(next(iter(curves.values())))
    rows = [[name, *(f"{curve[k]['rfid']:.2f} / {curve[k]['psnr']:.2f}" for k in ks)] for name, curve in curves.items()]
    means = {}
    for draw in DRAWS:
        runs = [c for name, c in curves.items() if name.split("-seed")[0] == draw]
        if runs:
            means[draw] = {k: statistics.mean(c[k]["rfid"] for c in runs) for k in ks}
            rows.append([f"{draw}: mean rFID over {len(runs)} seeds", *(f"{means[draw][k]:.2f}" for k in ks)])
    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / "nested-draw.json", {"curves": curves, "mean_rfid": means,
                                           "pilots": {n: str(p) for n, p in pilots.items()},
                                           "machine": machine(), "date": utc_now()})
    table = markdown_table(["draw-seed", *(f"k = {k}: rFID / PSNR" for k in ks)], rows)
    (dest / "nested-draw.md").write_text("# Nested dropout's draw: uniform k vs all tokens half the time "
                                         "(CIFAR-10, standard budget)\n\n" + table + "\n")
    print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draw", choices=list(DRAWS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="zip:../shared/data/cifar10-jpeg.zip")
    ap.add_argument("--out", type=Path, default=Path("runs/nested-draw"))
    ap.add_argument("--collect", nargs="+", metavar="NAME=PILOT", help="DRAW-seedN=PILOT pairs: write the table")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "nested-draw")
    args = ap.parse_args(argv)
    if args.collect:
        collect({pair.split("=", 1)[0]: Path(pair.split("=", 1)[1]) for pair in args.collect}, args.results)
    elif args.draw:
        run(args.draw, args.seed, args.data, args.out)
    else:
        ap.error("give --draw (a run) or --collect (the table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
