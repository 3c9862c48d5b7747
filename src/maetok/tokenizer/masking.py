"""Patch masking for MAETok's mask modelling (training only).

One ratio r per batch, drawn from a normal truncated to [ratio_min, ratio_max]; each sample then gets exactly
ceil(r * N) masked patches at random positions (MAE-style: argsort of uniform noise). Masked patches are
replaced by a learnable token, so the sequence length never changes; CLS and latent tokens are never masked.
"""
from __future__ import annotations

import math

import torch

from ..config import MaskConfig
from ..device import to_device


def sample_mask_ratio(cfg: MaskConfig, generator: torch.Generator | None = None) -> float:
    """Truncated normal by rejection; with a degenerate range (min == max or std == 0) the clamped mean."""
    if cfg.ratio_max <= cfg.ratio_min or cfg.ratio_std == 0:
        return min(max(cfg.ratio_mean, cfg.ratio_min), cfg.ratio_max)
    for _ in range(1000):
        r = cfg.ratio_mean + cfg.ratio_std * torch.randn((), generator=generator).item()
        if cfg.ratio_min <= r <= cfg.ratio_max:
            return r
    # Only reachable when the range sits far in a tail; uniform is the limit of the truncated normal there.
    return cfg.ratio_min + (cfg.ratio_max - cfg.ratio_min) * torch.rand((), generator=generator).item()


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, num_patches) bool, True = masked, exactly ceil(ratio * num_patches) True per row."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    num_masked = math.ceil(ratio * num_patches - 1e-9)  # guard ceil against float noise (0.5*64 -> 32, not 33)
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator else "cpu")
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise within its row
    return to_device(rank < num_masked, device)
