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
    """Truncated normal by rejection (as the official scipy truncnorm draws, in distribution); by inverting its
    CDF when the range holds under 1% of the normal's mass, where rejection would mostly miss. With a degenerate
    range (min == max or std == 0): the clamped mean."""
    if cfg.ratio_max <= cfg.ratio_min or cfg.ratio_std == 0:
        return min(max(cfg.ratio_mean, cfg.ratio_min), cfg.ratio_max)
    device = generator.device if generator is not None else None
    low = (cfg.ratio_min - cfg.ratio_mean) / cfg.ratio_std
    high = (cfg.ratio_max - cfg.ratio_mean) / cfg.ratio_std
    if _normal_mass(low, high) >= 0.01:
        while True:  # accepts within a few hundred draws with overwhelming probability
            r = cfg.ratio_mean + cfg.ratio_std * torch.randn((), generator=generator, device=device).item()
            if cfg.ratio_min <= r <= cfg.ratio_max:
                return r
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64).item()
    return cfg.ratio_mean + cfg.ratio_std * _truncated_normal_quantile(low, high, u)


def _normal_mass(low: float, high: float) -> float:
    """P(low <= Z <= high) for a standard normal Z, accurate in either tail."""
    if low > 0:  # both in the upper tail: difference of survival functions, not of CDFs near 1
        low, high = -high, -low
    ndtr = torch.special.ndtr
    return (ndtr(torch.tensor(high, dtype=torch.float64)) - ndtr(torch.tensor(low, dtype=torch.float64))).item()


def _truncated_normal_quantile(low: float, high: float, u: float) -> float:
    """The u-quantile of a standard normal truncated to [low, high], computed in the lower tail (mirrored when
    the range lies above 0) so that a range many standard deviations out keeps its precision."""
    mirrored = low > 0
    if mirrored:
        low, high = -high, -low
    lo, hi = (torch.special.ndtr(torch.tensor(v, dtype=torch.float64)) for v in (low, high))
    if hi <= 0:  # beyond float64's normal tail (about 38 standard deviations): the near end of the range
        z = high
    else:
        z = torch.special.ndtri(lo + u * (hi - lo)).clamp(low, high).item()
    return -z if mirrored else z


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, num_patches) bool, True = masked, exactly ceil(ratio * num_patches) True per row."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    num_masked = math.ceil(ratio * num_patches - 1e-9)  # guard ceil against float noise (0.5*64 -> 32, not 33)
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator else "cpu")
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise within its row
    return to_device(rank < num_masked, device)
