"""What a model costs: parameters, FLOPs per call (counted by torch's FlopCounterMode), measured throughput."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of one call of `fn`, as torch dispatches it."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def throughput(fn: Callable[[], object], items: int, warmup: int = 1, repeats: int = 3) -> float:
    """Items per second of `fn` (median of `repeats` timed calls after `warmup`)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return items / times[len(times) // 2]
