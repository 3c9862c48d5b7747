"""Shortcut models (Frans, Hafner, Levine, Abbeel 2024) as a distillation objective for a flow-matching teacher.

Time runs as everywhere here: t = 0 data, t = 1 noise, and sampling walks from t = 1 down to t = 0. A student
s(x_t, t, d) is told the step size d and predicts the average velocity over [t - d, t], so that one step is

    x_{t-d} = x_t - d * s(x_t, t, d)                       (the samplers' Euler update, with d = t_cur - t_next)

Targets, for step sizes d = 1/n with n = 1, 2, 4, ..., N (N = max_steps) on the grid t = j * d, j = 1..n:

- base, d = 1/N: the teacher's velocity with classifier-free guidance folded in, v = v_u + w (v_c - v_u) where
  low <= t <= high and v_c elsewhere: exactly what the samplers' guided Euler step uses at t_cur = t;
- self-consistency, d = 2h: two student steps of size h, taken without gradient,
      v1 = s(x_t, t, h),  x' = x_t - h * v1,  v2 = s(x', t - h, h),   target = (v1 + v2) / 2.

The student's N steps follow the guided teacher's N-step Euler path at one forward each (no unconditional
branch); each halving of the step count is learned from the step count above it.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from maetok.config import ConfigError, SampleConfig, SiTConfig
from maetok.config.distill import DistillConfig, is_power_of_two
from maetok.diffusion.transport import interpolate


# --------------------------------------------------------------------------------------------------------------
# Sampling with a student: which settings it takes
# --------------------------------------------------------------------------------------------------------------
def student_sample_config(model_cfg: SiTConfig, cfg: SampleConfig) -> SampleConfig:
    """The sampling settings a shortcut student runs with: `cfg` with its folded guidance. The step count must be
    a power of two up to the one it was distilled for; a guidance scale or interval left at its default means the
    folded one, and any other is refused, as is the stochastic sampler."""
    most = model_cfg.shortcut_steps
    scale, interval = model_cfg.shortcut_cfg_scale, tuple(model_cfg.shortcut_cfg_interval)
    if not is_power_of_two(cfg.steps) or cfg.steps > most:
        counts = ", ".join(str(2 ** k) for k in range(int(math.log2(most)) + 1))
        raise ConfigError(f"steps={cfg.steps}: this shortcut student samples in {counts} steps (a power of two "
                          f"up to the {most} it was distilled for)")
    if cfg.cfg_scale not in (1.0, scale):
        raise ConfigError(f"cfg_scale={cfg.cfg_scale:g}: this shortcut student has guidance at scale {scale:g} "
                          f"folded into its weights (one forward per step); leave the scale at its default or give "
                          f"{scale:g}")
    if tuple(cfg.cfg_interval) not in ((0.0, 1.0), interval):
        raise ConfigError(f"cfg_interval={list(cfg.cfg_interval)}: this shortcut student has its guidance folded in "
                          f"on t in {list(interval)}; leave the interval at its default or give that one")
    if cfg.sampler == "sde":
        raise ConfigError("sampler=sde: a shortcut student samples with its own deterministic update (sampler "
                          "euler or heun both mean it)")
    return replace(cfg, cfg_scale=scale, cfg_interval=interval)


# --------------------------------------------------------------------------------------------------------------
# Training targets
# --------------------------------------------------------------------------------------------------------------
def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, cfg_scale: float,
                    cfg_interval: tuple[float, float], null_label: int | None) -> torch.Tensor:
    """The velocity a guided sampler steps with at (x, t), per sample: guided where low <= t <= high (both
    inclusive, as the samplers decide at t_cur), the conditional prediction elsewhere. One call on [x; x] with
    labels [y; null] whenever any guidance is asked for: deciding per sample on the host would sync the device."""
    if cfg_scale <= 1.0 or y is None:
        return model(x, t, y).float()
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)])).float()
    cond, uncond = both.chunk(2)
    low, high = cfg_interval
    inside = ((t >= low) & (t <= high)).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(inside, uncond + cfg_scale * (cond - uncond), cond)


def consistency_target(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                       half: torch.Tensor) -> torch.Tensor:
    """(v1 + v2) / 2 of two steps of size `half` from (x, t): the target of one step of twice that size."""
    per_sample = half.view(-1, *([1] * (x.dim() - 1)))
    v1 = model(x, t, y, half).float()
    x_mid = x - per_sample * v1             # towards the data: t decreases by half
    v2 = model(x_mid, t - half, y, half).float()
    return (v1 + v2) / 2


def draw_step_counts(n_base: int, n_consistency: int, max_steps: int, device: torch.device) -> torch.Tensor:
    """Per sample, the step count n of its step size d = 1/n: max_steps for the base samples, and for the others
    1, 2, ..., max_steps / 2 with equal chances (the paper's uniform draw over log2 levels)."""
    levels = torch.randint(0, int(math.log2(max_steps)), (n_consistency,), device=device)
    return torch.cat([torch.full((n_base,), max_steps, device=device), 2 ** levels])


def draw_grid_times(step_counts: torch.Tensor) -> torch.Tensor:
    """t = j / n with j uniform in 1..n: the times at which a sampler with n steps calls the model."""
    n = step_counts.float()
    j = (torch.rand(n.shape, device=n.device) * n).floor().clamp(max=n - 1) + 1
    return j / n


def shortcut_loss(student, target_model, teacher, x0: torch.Tensor, y: torch.Tensor | None, cfg: DistillConfig,
                  null_label: int | None, path: str = "linear") -> dict[str, torch.Tensor]:
    """MSE of the student on one batch of clean latents x0 (B, L, C), the first share of it on base targets from
    the teacher and the rest on self-consistency targets from `target_model` (the student without gradient).

    `cfg` is resolved: cfg_scale and cfg_interval are set. Returns "loss" and its two parts as diagnostics.
    """
    x0 = x0.float()  # x_t and the targets in float32; autocast still runs the models in low precision
    batch = x0.shape[0]
    n_consistency = int(batch * (1 - cfg.base_fraction))
    n_base = batch - n_consistency
    steps = draw_step_counts(n_base, n_consistency, cfg.max_steps, x0.device)
    t = draw_grid_times(steps)
    d = 1.0 / steps.float()
    x_t, _ = interpolate(x0, torch.randn_like(x0), t, path)
    y_base, y_consistency = (None, None) if y is None else (y[:n_base], y[n_base:])
    with torch.no_grad():
        targets = [guided_velocity(teacher, x_t[:n_base], t[:n_base], y_base, cfg.cfg_scale,
                                   tuple(cfg.cfg_interval), null_label)]
        if n_consistency:
            targets.append(consistency_target(target_model, x_t[n_base:], t[n_base:], y_consistency, d[n_base:] / 2))
    v = student(x_t, t, y, d).float()  # loss in float32 even under bf16 autocast
    if v.shape != x0.shape:
        raise ValueError(f"model returned shape {tuple(v.shape)} for input {tuple(x0.shape)}; expected the same")
    squared = (v - torch.cat(targets)).pow(2)
    consistency = squared[n_base:].mean() if n_consistency else torch.zeros((), device=x0.device)
    return {"loss": squared.mean(), "mse_base": squared[:n_base].mean().detach(),
            "mse_consistency": consistency.detach()}
