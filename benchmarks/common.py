"""Shared pieces of the benchmark scripts: machine description, timing, FLOP counting, matmul peak, memory, output.

The scripts run as `python benchmarks/<name>.py`, so this directory is on sys.path and `import common` works.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from maetok.eval.cost import count_flops as maetok_count_flops

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------------------
def machine(device: torch.device | str | None = None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()}
    if hasattr(os, "getloadavg"):  # other work on a shared machine shows here, and in the numbers
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------
def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], reps: int, warmup: int = 1, device=None,
               cpu_times: list[float] | None = None, sync_each: bool = True) -> list[float]:
    """Seconds per call, `reps` calls after `warmup` untimed ones (allocator, first-call dispatch, autotuning).
    Host clock with a device synchronize around each call: the scripts time whole steps of many kernels.
    sync_each=False: the calls back to back with one synchronize at the end, as a training loop runs its steps
    (the next step's launches overlap the last one's kernels); returns their mean, once.
    `cpu_times`, if given, receives each call's process CPU seconds (user + system)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if not sync_each:
        cpu, start = process_cpu_seconds(), time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        if cpu_times is not None:
            cpu_times.append((process_cpu_seconds() - cpu) / reps)
        return [(time.perf_counter() - start) / reps]
    times = []
    for _ in range(reps):
        cpu = process_cpu_seconds()
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(process_cpu_seconds() - cpu)
    return times


def process_cpu_seconds() -> float:
    """CPU time of this process. On a shared machine it leaves out the time other jobs held the cores, so with
    one thread it measures the code's own cost where wall-clock time also measures the neighbours."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1, device=None) -> float:
    return statistics.median(time_calls(fn, reps, warmup, device))


# --------------------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls, convolutions and attention that one real call of `fn` runs,
    with autograd as the call itself sets it (a training step's backward is counted)."""
    return maetok_count_flops(fn, grad=torch.is_grad_enabled())


# --------------------------------------------------------------------------------------------------------------
# The machine's matmul peak
# --------------------------------------------------------------------------------------------------------------
def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                reps: int = 5) -> dict:
    """FLOP/s of a large square matmul on random data. CPU: the best of `reps` (a shared machine's other load
    only ever slows it down); GPU: the median of `reps` after warm-up, timed with CUDA events."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n ** 3
    if device.type == "cuda":
        for _ in range(3):
            a @ b
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = statistics.median(times)
    else:
        seconds = min(time_calls(lambda: a @ b, reps, warmup=1))
    return {"flops_per_s": flops / seconds, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "statistic": "median" if device.type == "cuda" else "best"}


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------
def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB). Sees torch's allocations, which
    tracemalloc does not; run one case per process to read a case's own peak from the delta."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: /proc/self/clear_refs) and return the current
    RSS in bytes; None where that is not possible. Without it, a peak reached while building the model (random
    initialisation's temporaries) would hide a smaller peak of the calls measured after it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------
def write_json(path: Path, result: dict) -> None:
    """Atomically: scripts rewrite their results after every case, and a kill mid-write must not leave a file
    the next run cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    where = f"{m['gpu']} ({m['multiprocessors']} SMs), CUDA {m['cuda']}; host " if "gpu" in m else ""
    return (f"Machine: {where}{m['cpu']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}, Python {m['python']}")


# --------------------------------------------------------------------------------------------------------------
# One measured case
# --------------------------------------------------------------------------------------------------------------
def measure(fn: Callable[[], object], images: int, reps: int, warmup: int = 1, device=None,
            flops: bool = True, prime: Callable[[], object] | None = None, memory: bool = False,
            sync_each: bool = True) -> dict:
    """Time `fn` (one call handles `images` images) and count its FLOPs on one extra real call.
    sync_each: see `time_calls` (False: back-to-back calls, as a training loop runs its steps).

    memory: peak memory growth of the timed calls per image. On CUDA from the allocator's peak; on CPU from the
    process's peak RSS (reset first where Linux allows), so best read in a process running this one case. `prime` (e.g. a batch-1
    training step) runs first so that state every step keeps (optimizer moments, gradients) is not counted.
    """
    device = torch.device(device or "cpu")
    cuda = device.type == "cuda"
    if prime is not None:
        prime()
        sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
        base = max_rss_bytes() if base is None else base
    cpu_times: list[float] = []
    times = time_calls(fn, reps, warmup, device, cpu_times, sync_each)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()) - base
    seconds = statistics.median(times)
    out = {"images_per_call": images, "reps": reps, "seconds_per_call": seconds,
           "seconds_all": times, "images_per_s": images / seconds, "sync_each_call": sync_each}
    if not cuda:
        out["cpu_seconds_per_call"] = statistics.median(cpu_times)
    if memory:
        out["peak_memory_mib_per_image"] = max(peak, 0) / images / 2**20
        out["memory_source"] = "torch.cuda.max_memory_allocated" if cuda else "peak RSS growth"
    if flops:
        total = count_flops(fn)
        sync(device)
        out.update(flops_per_call=total, gflops_per_image=total / images / 1e9, flops_per_s=total / seconds)
        if not cuda:
            out["flops_per_cpu_s"] = total / out["cpu_seconds_per_call"]
    return out
