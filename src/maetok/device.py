"""Moving tensors made on the host (the CPU RNG's draws: flips, masks) to the accelerator without stalling it."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to a GPU through pinned memory without blocking: a plain copy from
    pageable memory waits for every kernel queued before it, so one per training step leaves the GPU idle at the
    start of each step. Elsewhere a plain `.to`."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
