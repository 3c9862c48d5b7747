"""Put several finished pilots side by side: the same metric, per variant, across runs that differ in one thing
(a tokenizer seed, a budget field, the data), with the mean and spread when there are several.

    maetok pilot --data zip:../shared/data/cifar10-jpeg.zip --budget standard --out runs/p-seed0
    maetok pilot --data zip:../shared/data/cifar10-jpeg.zip --budget standard --out runs/p-seed1 \\
        --tokenizer-set train.seed=1
    python benchmarks/pilot_compare.py runs/p-seed0 runs/p-seed1 --labels "tokenizer seed 0" "tokenizer seed 1" \\
        --out runs/tokenizer-seeds.md

Reads each pilot's report.json; metrics are picked by prefix (`gfid[`, `rfid[`, `psnr@`, `probe_top1@`,
`gmm_nll@K=8` ...; see --metrics), so the feature network and sample count in their names must agree across the
pilots (a comparison of different FIDs is refused).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import markdown_table

DEFAULT_METRICS = ["gfid[", "rfid[", "psnr@", "ssim@", "probe_top1@", "gmm_nll@K=8"]


def load_report(pilot: Path) -> dict:
    path = pilot / "report.json"
    if not path.is_file():
        raise SystemExit(f"{pilot}: no report.json (is the pilot finished?)")
    return json.loads(path.read_text())


def pick(report: dict, variant: str, prefixes: list[str]) -> dict[str, float]:
    """The variant's metrics whose names start with one of `prefixes` (with and without CFG for gFID)."""
    values = report.get(variant, {})
    return {k: v for k, v in values.items() if any(k.startswith(p) for p in prefixes)
            and isinstance(v, (int, float)) and "inception" not in k and not k.startswith(("kid_std", "is_std"))}


def compare(pilots: list[Path], labels: list[str], prefixes: list[str]) -> tuple[str, dict]:
    reports = [load_report(p) for p in pilots]
    variants = [v for v in ("ae", "vae", "maetok", "mae") if all(v in r for r in reports)]
    if not variants:
        raise SystemExit("the pilots have no variant in common")
    table: dict = {}
    for v in variants:
        per_run = [pick(r, v, prefixes) for r in reports]
        keys = sorted(set(per_run[0]))
        for pilot, metrics in zip(pilots[1:], per_run[1:]):
            if set(metrics) != set(keys):
                raise SystemExit(f"{pilot}: metrics {sorted(set(metrics) ^ set(keys))} are not in every pilot "
                                 f"(other feature network or sample count?)")
        table[v] = {k: [m[k] for m in per_run] for k in keys}
    metrics = sorted({k for v in table.values() for k in v})
    headers = ["metric", "variant", *labels] + (["mean ± sd"] if len(pilots) > 1 else [])
    rows = []
    for k in metrics:
        for v in variants:
            vals = table[v].get(k)
            if vals is None:
                continue
            row = [k, v, *map(_fmt, vals)]
            if len(vals) > 1:
                mean = statistics.mean(vals)
                row.append(f"{_fmt(mean)} ± {_fmt(statistics.stdev(vals), like=mean)}")
            rows.append(row)
    data = reports[0].get("data", "?")
    lines = [f"Pilots on `{data}` side by side ({', '.join(str(p) for p in pilots)}).", ""]
    dims = [r.get("gmm_pca_dim") for r in reports]
    if len(set(map(str, dims))) > 1:
        lines += [f"Note: the GMM NLLs were measured in different PCA dimensions ({dims}); compare them within a "
                  "pilot, not across.", ""]
    md = "\n".join([*lines, markdown_table(headers, rows)])
    return md, {"pilots": [str(p) for p in pilots], "labels": labels, "metrics": table}


def _fmt(x: float, like: float | None = None) -> str:
    """3 decimals below 10, else 2; `like`: as many decimals as that value gets (a spread next to its mean)."""
    return f"{x:.3f}" if abs(x if like is None else like) < 10 else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pilots", nargs="+", type=Path)
    ap.add_argument("--labels", nargs="+", help="one per pilot (default: folder names)")
    ap.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS, help="metric name prefixes")
    ap.add_argument("--out", type=Path, help="write the table here (and the numbers beside it as .json)")
    args = ap.parse_args(argv)
    labels = args.labels or [p.name for p in args.pilots]
    if len(labels) != len(args.pilots):
        raise SystemExit(f"{len(labels)} labels for {len(args.pilots)} pilots")
    md, numbers = compare(args.pilots, labels, args.metrics)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
