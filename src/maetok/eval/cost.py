"""What a model costs: parameters, FLOPs per call (counted by torch's FlopCounterMode), measured throughput."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sdpa_cpu_forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def flop_formulas() -> dict:
    """Formulas torch's counter lacks: it knows the CUDA attention kernels but not the CPU flash kernel that
    CPU SDPA dispatches to, so without these every attention matmul on a CPU would count as zero (8-11% of a
    tokenizer's FLOPs) and the same model would cost less on a CPU than on a GPU."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward
    return mapping


def count_flops(fn: Callable[[], object], grad: bool = False) -> int:
    """FLOPs (2 per multiply-add) of the matmuls, convolutions and attention that one real call of `fn` runs
    (without autograd unless `grad`). Elementwise work (norms, activations, an optimizer) is not counted, as
    is usual for MFU."""
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter, torch.set_grad_enabled(grad):
        fn()
    return counter.get_total_flops()


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(fn: Callable[[], object], items: int, warmup: int = 1, repeats: int = 3,
               device: torch.device | str | None = None) -> float:
    """Items per second of `fn` (median of `repeats` timed calls after `warmup`). On a GPU the clock waits for
    the queued kernels (`device`), else it would time the launches."""
    device = torch.device(device) if device is not None else None
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _synchronize(device)
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    return items / times[len(times) // 2]


@torch.no_grad()
def generation_gflops(tokenizer, sit, image: torch.Tensor) -> dict[str, float | int]:
    """GFLOPs of one SiT forward pass and of one decode, for one (1, 3, H, W) `image`, at the token count the SiT
    generates: K of a nested-dropout tokenizer's L when it was trained on a prefix cache (the SiT then runs on K
    tokens and the decoder starts from K), else L. A prefix the tokenizer does not decode from is refused by its
    encode, in one line naming K, L and the trained counts."""
    k = int(sit.config.num_tokens)
    z = tokenizer.encode(image, tokens=k)
    t = torch.full((1,), 0.5, device=image.device)
    y = torch.zeros(1, dtype=torch.long, device=image.device) if sit.null_label is not None else None
    return {"sit_forward_gflops": count_flops(lambda: sit(tokenizer.normalize(z), t, y)) / 1e9,
            "decode_gflops": count_flops(lambda: tokenizer.decode(z, tokens=k)) / 1e9,
            "tokens": k}
