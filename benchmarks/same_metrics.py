"""Do two pilot reports hold the same quality metrics, bit for bit? A check that a change to the code changed
no number the pilot measures (run both pilots on one machine, at one thread: summation order follows the thread
count and the CPU's kernels).

    python benchmarks/same_metrics.py runs/before/report.json runs/after/report.json

Compares every number of every variant and the top-level metrics (feature network accuracy, real-data floor),
leaving out what is measured with a clock or depends on the machine's load: wall times, throughput, peak memory.
Exit status 0 when every compared number is identical, 1 otherwise (each difference printed).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CLOCK_WORDS = ("wall_s", "per_s", "images_per_s", "throughput", "peak_", "rss", "seconds", "_ms")
NOT_METRICS = ("settings", "environment", "data", "budget")


def numbers(node, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON tree, keyed by its dotted path."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in numbers(child, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, child in enumerate(node) for k, v in numbers(child, f"{prefix}{i}.").items()}
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return {prefix.rstrip("."): node}
    return {}


def quality_metrics(report: dict) -> dict[str, float]:
    found = numbers({k: v for k, v in report.items() if k not in NOT_METRICS})
    return {k: v for k, v in found.items() if not any(word in k for word in CLOCK_WORDS)}


def main(argv: list[str]) -> int:
    before, after = (quality_metrics(json.loads(Path(p).read_text())) for p in argv[:2])
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for key in differ:
        print(f"{key}: {before.get(key)} -> {after.get(key)}")
    print(f"{len(before.keys() & after.keys()) - len(set(differ) & before.keys() & after.keys())} of "
          f"{len(before.keys() | after.keys())} metrics identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
