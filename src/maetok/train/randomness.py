"""Training's random draws that must resume exactly: the global RNG's seed for each step of each rank, and the
tasks' one data augmentation (a horizontal flip per item), drawn from that RNG on the main process."""
from __future__ import annotations

import numpy as np
import torch

from ..device import to_device


def pick_flipped(x: torch.Tensor, x_flipped: torch.Tensor) -> torch.Tensor:
    """Per item, `x` or `x_flipped` with probability 1/2, drawn on the main process's CPU RNG: part of the
    resumable state, and reseeded per step and rank under DDP (the tasks' one kind of data augmentation)."""
    pick = to_device(torch.rand(x.shape[0]) < 0.5, x.device)
    return torch.where(pick.view(-1, *([1] * (x.dim() - 1))), x_flipped, x)


def rank_step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG's seed for one step of one DDP rank: well mixed, distinct for every (seed, step, rank)."""
    return int(np.random.SeedSequence([seed % 2**64, step, rank]).generate_state(1, np.uint64)[0])
