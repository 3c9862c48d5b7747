"""Every benchmark case in one table: images/s, achieved FLOP/s, MFU against a measured matmul peak, memory/image.

    .venv/bin/python benchmarks/mfu.py [--quick] [--threads N] [--cases a,b]

Cases (CPU, fp32):
  tokenizer-train    cpu-32 preset training step (masking + HOG aux, losses, backward, clip, AdamW, EMA), batch 64
  tokenizer-encode   cpu-32 encode, batch 64
  tokenizer-decode   cpu-32 decode, batch 64
  sit-train          SiT-S/1 on 128 tokens of dim 32 (width 384, depth 12), flow-matching step + AdamW, batch 32
  sit-sample         the same SiT-S/1, Euler sampling (no CFG), batch 32
  maetok-b-128       maetok-b-128 encode + decode at 256x256, batch 2

FLOPs: torch.utils.flop_counter on one real call of the case (forward + backward for training), 2 per multiply-add,
matmuls / convolutions / attention only. Peak: a 2048^3 fp32 matmul, best of 5, measured in this run at the
start, at the end and inside every case's process; MFU = achieved FLOP/s / the best of these. "MFU per
CPU-second" divides by the process's CPU time instead of wall time: on a machine shared with other jobs it
shows the code's own efficiency, where MFU also shows the neighbours' load. Memory: each case
runs in its own process and reports its peak-RSS growth per image (after a batch-1 step for training cases, so
that weights, gradients and AdamW moments are not counted).

Threads default to 1: this 2-core machine is shared with training jobs, and with 2 OpenMP threads each of the
model's hundreds of parallel regions waits for a preempted thread (measured: 30-50% of peak instead of 90% for
the same maetok-b-128 encode). Pass --threads 0 for torch's default.

Writes benchmarks/results/mfu.json and benchmarks/results/mfu.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from common import (RESULTS_DIR, machine, machine_line, markdown_table, matmul_peak, measure, utc_now,
                    write_json)
from maetok.config import SampleConfig, TransportConfig
from maetok.diffusion import SiT, sample, sit_config, training_loss

# name: (what, report floor as a fraction of the matmul peak or None)
CASES: dict[str, tuple[str, float | None]] = {
    "tokenizer-train": ("tokenizer train step, cpu-32, batch 64", 0.65),
    "tokenizer-encode": ("tokenizer encode, cpu-32, batch 64", None),
    "tokenizer-decode": ("tokenizer decode, cpu-32, batch 64", None),
    "sit-train": ("SiT-S/1 train step, 128x32 tokens, batch 32", 0.75),
    "sit-sample": ("SiT-S/1 Euler sampling, 128x32 tokens, batch 32", None),
    "maetok-b-128": ("maetok-b-128 encode+decode, 256px, batch 2", 0.85),
}


# --------------------------------------------------------------------------------------------------------------
# SiT cases (the tokenizer's live in tokenizer.py)
# --------------------------------------------------------------------------------------------------------------
def sit_train_fn(size: str, tokens: int, channels: int, batch: int, device, precision: str = "fp32",
                 compile: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
    """A SiT training step (flow-matching loss, backward, AdamW) and its batch-1 twin."""
    from maetok.train.loop import autocast_for

    device = torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = SiT(sit_config(size, in_channels=channels, num_tokens=tokens, num_classes=1000)).train()
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, tokens, channels, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)

    def step(x, labels):
        with autocast_for(device, precision):
            loss = training_loss(forward, x, labels, TransportConfig(), g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return (lambda: step(x0, y)), (lambda: step(x0[:1], y[:1]))


def sit_sample_fn(size: str, tokens: int, channels: int, batch: int, steps: int, device,
                  dtype: torch.dtype = torch.float32, cfg_scale: float = 1.0,
                  compile: bool = False) -> Callable[[], torch.Tensor]:
    """Euler sampling of `steps` model calls (the sampler feeds the model in the dtype of its weights);
    compile: the model through torch.compile, as `maetok sample --compile` runs it."""
    from maetok.train.loop import CompiledOrEager

    device = torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = SiT(sit_config(size, in_channels=channels, num_tokens=tokens, num_classes=1000)).eval().to(dtype)
    model = CompiledOrEager(model, f"SiT-{size}", enabled=compile)
    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(batch, tokens, channels, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)
    run_cfg = SampleConfig("euler", steps=steps, cfg_scale=cfg_scale)
    return lambda: sample(model, noise, y, run_cfg)


def build_case(name: str, quick: bool) -> dict:
    from tokenizer import inference_fns, train_step_fn

    if name == "tokenizer-train":
        fn, prime, _ = train_step_fn("cpu-32", 64, "cpu")
        return dict(fn=fn, prime=prime, images=64)
    if name in ("tokenizer-encode", "tokenizer-decode"):
        fns, _ = inference_fns("cpu-32", 64, "cpu")
        return dict(fn=fns[name.split("-")[1]], images=64)
    if name == "sit-train":
        fn, prime = sit_train_fn("S", 128, 32, 32, "cpu")
        return dict(fn=fn, prime=prime, images=32)
    if name == "sit-sample":
        steps = 2 if quick else 4
        return dict(fn=sit_sample_fn("S", 128, 32, 32, steps, "cpu"), images=32, note=f"Euler, {steps} steps")
    if name == "maetok-b-128":
        fns, _ = inference_fns("maetok-b-128", 2, "cpu")
        return dict(fn=fns["encode+decode"], images=2)
    raise ValueError(f"unknown case {name!r}; choose from {list(CASES)}")


def run_case(name: str, reps: int, quick: bool) -> dict:
    """In a fresh process: build, measure the peak beside it, time, count FLOPs, read the peak memory."""
    case = build_case(name, quick)
    peak = matmul_peak("cpu")["flops_per_s"]
    r = measure(case["fn"], case["images"], reps, prime=case.get("prime"), memory=True)
    return {"case": name, "what": CASES[name][0], "note": case.get("note", ""), "case_peak_flops_per_s": peak, **r}


# --------------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes on 1 thread)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "mfu.json")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)  # internal: one case in this process
    parser.add_argument("--reps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 4)
    if args.run_case:
        print(json.dumps(run_case(args.run_case, reps, args.quick)))
        return None

    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    info = machine("cpu")
    peaks = [matmul_peak("cpu")["flops_per_s"]]
    rows = []
    for name in names:
        start = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-case", name, "--reps", str(reps),
               "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"case {name} failed (exit {proc.returncode})")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks.append(row["case_peak_flops_per_s"])
        rows.append(row)
        print(f"  {name}: {row['images_per_s']:.2f} img/s, {row['flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    peaks.append(matmul_peak("cpu")["flops_per_s"])
    peak = max(peaks)
    for row in rows:
        row["mfu"] = row["flops_per_s"] / peak
        # Per CPU-second of this process: what the code costs when the neighbours' share of the cores is left
        # out. Meaningful with one thread (with more, waiting threads also burn CPU time).
        row["mfu_cpu_time"] = row["flops_per_cpu_s"] / peak if torch.get_num_threads() == 1 else None
        row["floor"] = CASES[row["case"]][1]
        row["meets_floor"] = None if row["floor"] is None else row["mfu"] >= row["floor"]
    result = {"machine": info, "date": utc_now(), "quick": args.quick, "device": "cpu",
              "peak": {"flops_per_s": peak, "how": "fp32 2048^3 matmul, best of 5; max over the run's "
                       "measurements", "all": peaks},
              "settings": {"precision": "fp32", "reps": reps, "timing": f"median of {reps} calls after 1 warm-up",
                           "flops": "torch.utils.flop_counter on one real call, 2 FLOPs per multiply-add"},
              "rows": rows}
    write_json(args.out, result)
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return result


def markdown(result: dict) -> str:
    peak = result["peak"]["flops_per_s"]
    table = []
    for r in result["rows"]:
        floor = "" if r["floor"] is None else f"{r['floor']:.0%} ({'met' if r['meets_floor'] else 'not met'})"
        what = r["what"] + (f" ({r['note']})" if r.get("note") else "")
        cpu_mfu = "" if r.get("mfu_cpu_time") is None else f"{r['mfu_cpu_time']:.0%}"
        table.append([what, f"{r['images_per_s']:.2f}", f"{r['gflops_per_image']:.2f}",
                      f"{r['flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.0%}", floor, cpu_mfu,
                      f"{r['peak_memory_mib_per_image']:.1f}"])
    return "\n".join([
        machine_line(result["machine"]) + (" (--quick)" if result["quick"] else ""),
        f"Peak: {peak / 1e9:.1f} GFLOP/s ({result['peak']['how']}); {result['settings']['timing']}; "
        f"1-minute load average at the start {result['machine'].get('loadavg_1min', '?')}", "",
        markdown_table(["case", "images/s", "GFLOPs / image", "GFLOP/s", "MFU", "floor", "MFU per CPU-second",
                        "peak MiB / image"], table)])


if __name__ == "__main__":
    main()
