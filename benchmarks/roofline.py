"""Where a GPU training step's time would go, estimated from a CPU trace: for sessions without a GPU.

    .venv/bin/python benchmarks/roofline.py [--preset maetok-b-128] [--batch 64] [--targets teachers|hog]
                                            [--set KEY=VALUE ...] [--out benchmarks/results/roofline]

The tokenizer training step of benchmarks/gpu.py (bf16 autocast, masking, the same auxiliary targets, losses,
backward, gradient clipping, AdamW, EMA) runs on the CPU at batch 1 and at batch 2 under a dispatch mode that
records every aten operator: its FLOPs (torch's flop-counter formulas) and the bytes it reads and writes (its
tensor inputs and outputs; views move nothing). Each operator is extrapolated linearly to --batch and modelled
as one GPU kernel:

    time = max(FLOPs / peak, bytes / bandwidth) + launch

with the peak and bandwidth of the GPU the last `gpu.sh` ran on (H200: 792 TFLOP/s bf16 matmul measured, 4.3 TB/s
copy bandwidth). The optimizer and EMA run per parameter on the CPU; on a GPU AdamW is fused and the EMA is one
foreach call, so their operators are modelled by their bytes alone plus one launch per operator kind (an upper
bound: the per-parameter operators read the same tensors several times, a fused kernel once).

What it is for: which operators an eager GPU step spends its time on, before a GPU is available (e.g. matmuls vs
autocast's casts vs the RoPE's complex arithmetic), and a prediction that the next GPU run can check. What it is
not: a measurement. It ignores kernel efficiency below peak (small matmuls), caching, overlap, and the host's
launch rate; it knows nothing of torch.compile's fusion. Against the two eager H200 steps measured in
results/gpu.json it is low by the same factor, about 1.5 (results/roofline-hog.md, roofline-fp32-teachers.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from maetok.eval.cost import flop_formulas

from common import RESULTS_DIR, machine, machine_line, markdown_table, utc_now, write_json

MATMUL_LIKE = ("mm", "addmm", "bmm", "baddbmm", "convolution", "attention")
CATEGORIES = [  # first match wins; matched against the operator's name
    ("matmul / conv / attention", MATMUL_LIKE),
    ("dtype casts (autocast)", ("_to_copy",)),
    ("layer norm", ("layer_norm",)),
    ("activations", ("gelu", "silu", "sigmoid", "tanh")),
    ("copies (cat, stack, clone)", ("cat", "stack", "clone", "copy_", "contiguous")),
    ("reductions", ("sum", "mean", "norm", "amax", "max", "min")),
    ("elementwise arithmetic", ("mul", "add", "sub", "div", "neg", "pow", "sqrt", "rsqrt", "exp", "where",
                                "lerp", "addcmul", "addcdiv")),
]


def category(op: str) -> str:
    name = op.removeprefix("aten.")
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class OpRecorder(TorchDispatchMode):
    """Records (operator, phase, FLOPs, bytes) for every operator that is not a view."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, str, int, int]] = []
        self.phase = "forward+backward"
        # torch's formulas (2 FLOPs per multiply-add), plus the CPU attention kernel they lack, exactly as
        # benchmarks/common.count_flops counts them
        self.formulas = FlopCounterMode(display=False, custom_mapping=flop_formulas()).flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        packet = func._overloadpacket
        flops = self.formulas[packet](*args, **kwargs, out_val=out) if packet in self.formulas else 0
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.ops.append((str(packet), self.phase, int(flops), _bytes(ins) + _bytes(outs)))
        return out


def trace_step(preset: str, batch: int, targets: str, overrides: list[str]) -> list[tuple[str, str, int, int]]:
    """Every operator of one tokenizer training step at `batch` (after a first step that creates AdamW's state)."""
    import gpu
    from tokenizer import train_step_fn

    chosen = gpu.TEACHERS if targets == "teachers" else gpu.TEACHERS[:1]
    step, _, _ = train_step_fn(preset, batch, "cpu", precision="bf16", overrides=[*gpu.STEP_OVERRIDES, *overrides],
                               aux_targets=gpu.aux_targets(chosen))
    step()  # AdamW's moments and the autocast caches exist from here on, as in every later step
    recorder = OpRecorder()

    def optimizer_starts(*_):  # from here to the step's end: AdamW, then the EMA update
        recorder.phase = "optimizer + EMA"

    hook = register_optimizer_step_pre_hook(optimizer_starts)
    try:
        torch.manual_seed(0)  # the same mask ratio in both traces
        with recorder:
            step()
    finally:
        hook.remove()
    # Gradient clipping's foreach norms run just before the optimizer: move them into its phase.
    return [(op, "optimizer + EMA" if op.startswith("aten._foreach") else phase, f, b)
            for op, phase, f, b in recorder.ops]


def extrapolate(small: list, large: list, batch: int) -> list[dict]:
    """Per operator kind and phase: FLOPs and bytes at `batch` from traces at batch 1 (`small`) and 2 (`large`),
    operator by operator where both traces ran the same number of that kind (else as one aggregate)."""
    def group(ops):
        g = defaultdict(list)
        for op, phase, f, b in ops:
            g[(op, phase)].append((f, b))
        return g

    g1, g2 = group(small), group(large)
    rows = []
    for key in sorted(set(g1) | set(g2)):
        a, b = g1.get(key, []), g2.get(key, [])
        pairs = list(zip(a, b)) if len(a) == len(b) else [(
            (sum(x[0] for x in a), sum(x[1] for x in a)), (sum(x[0] for x in b), sum(x[1] for x in b)))]
        ops = [(max(f1 + (batch - 1) * (f2 - f1), 0), max(b1 + (batch - 1) * (b2 - b1), 0))
               for (f1, b1), (f2, b2) in pairs]
        rows.append({"op": key[0], "phase": key[1], "calls": max(len(a), len(b)), "per_op": ops})
    return rows


def model_times(rows: list[dict], peak: float, bandwidth: float, launch: float) -> dict:
    """Each row's modelled seconds; the optimizer phase as fused (its bytes, one launch per operator kind)."""
    for r in rows:
        flops = sum(f for f, _ in r["per_op"])
        nbytes = sum(b for _, b in r["per_op"])
        if r["phase"] == "optimizer + EMA":
            seconds = nbytes / bandwidth + launch
        else:
            seconds = sum(max(f / peak, b / bandwidth) for f, b in r["per_op"]) + launch * r["calls"]
        r.update(flops=flops, bytes=nbytes, seconds=seconds, category=category(r["op"]))
        del r["per_op"]
    total = sum(r["seconds"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    return {"seconds": total, "flops": flops, "bytes": sum(r["bytes"] for r in rows),
            "flop_floor_seconds": flops / peak, "mfu": flops / peak / total if total else 0.0,
            "kernels": sum(r["calls"] for r in rows if r["phase"] != "optimizer + EMA")}


def markdown(result: dict, top: int = 20) -> str:
    s, rows = result["summary"], result["rows"]
    by_cat = defaultdict(lambda: [0.0, 0, 0])
    for r in rows:
        key = "optimizer + EMA (fused on a GPU)" if r["phase"] == "optimizer + EMA" else r["category"]
        c = by_cat[key]
        c[0] += r["seconds"]
        c[1] += r["bytes"]
        c[2] += r["calls"]
    g = result["gpu_model"]
    lines = [machine_line(result["machine"]) + " (the trace's machine; the times below are a model of a GPU)", "",
             f"Step: {result['what']}. Model: {g['peak_tflops']:.0f} TFLOP/s, {g['bandwidth_tbs']:.1f} TB/s, "
             f"{g['launch_us']:.0f} µs per kernel; each operator max(FLOPs/peak, bytes/bandwidth) + launch. "
             f"Made with `{result['command']}`.", "",
             f"Modelled eager step: **{s['seconds'] * 1e3:.0f} ms** for {s['flops'] / 1e12:.1f} TFLOP "
             f"(floor {s['flop_floor_seconds'] * 1e3:.0f} ms at peak) and {s['bytes'] / 1e9:.0f} GB moved, "
             f"{s['kernels']} kernels: MFU {s['mfu']:.0%} if the model held.", ""]
    cat_rows = [[k, f"{v[0] * 1e3:.1f}", f"{v[0] / s['seconds']:.0%}", f"{v[1] / 1e9:.1f}", v[2]]
                for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1][0])]
    lines += [markdown_table(["operators", "model ms", "share", "GB", "calls"], cat_rows), "",
              f"Top {top} operators:", ""]
    top_rows = [[r["op"], r["phase"], r["calls"], f"{r['flops'] / 1e12:.2f}", f"{r['bytes'] / 1e9:.2f}",
                 f"{r['seconds'] * 1e3:.2f}"] for r in sorted(rows, key=lambda r: -r["seconds"])[:top]]
    lines.append(markdown_table(["operator", "phase", "calls", "TFLOP", "GB", "model ms"], top_rows))
    if result.get("measured"):
        lines += ["", "Against the measured GPU step: " + result["measured"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="maetok-b-128")
    parser.add_argument("--batch", type=int, default=64, help="the GPU batch to extrapolate to")
    parser.add_argument("--targets", choices=["teachers", "hog"], default="teachers",
                        help="HOG + DINOv2/SigLIP-sized teachers (random weights), or HOG alone")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="tokenizer config overrides, e.g. teacher_precision=fp32")
    parser.add_argument("--peak-tflops", type=float, default=792.0)
    parser.add_argument("--bandwidth-tbs", type=float, default=4.3)
    parser.add_argument("--launch-us", type=float, default=4.0)
    parser.add_argument("--measured-ms", type=float, help="the measured GPU step, to print beside the model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "roofline",
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    small = trace_step(args.preset, 1, args.targets, args.overrides)
    large = trace_step(args.preset, 2, args.targets, args.overrides)
    rows = extrapolate(small, large, args.batch)
    summary = model_times(rows, args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12, args.launch_us * 1e-6)
    what = (f"{args.preset} train step, batch {args.batch}, bf16 autocast, aux "
            f"{'hog+dinov2+siglip' if args.targets == 'teachers' else 'hog'}"
            + "".join(f", {o}" for o in args.overrides))
    command = "python benchmarks/roofline.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"machine": machine("cpu"), "date": utc_now(), "command": command.strip(), "what": what, "trace_seconds":
              time.perf_counter() - start, "gpu_model": {"peak_tflops": args.peak_tflops,
              "bandwidth_tbs": args.bandwidth_tbs, "launch_us": args.launch_us}, "summary": summary, "rows": rows}
    if args.measured_ms:
        result["measured"] = (f"{args.measured_ms:.0f} ms measured vs {summary['seconds'] * 1e3:.0f} ms modelled "
                              f"(ratio {args.measured_ms / (summary['seconds'] * 1e3):.2f})")
    write_json(args.out.with_suffix(".json"), result)
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
