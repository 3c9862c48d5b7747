"""Flow-matching transport between data and Gaussian noise, with one time convention: t = 0 data, t = 1 noise.

    x_t = alpha(t) * x0 + sigma(t) * eps,      target velocity v = d x_t / dt = alpha'(t) * x0 + sigma'(t) * eps

Paths: "linear" (alpha = 1 - t, sigma = t, so v = eps - x0) and "cosine" (alpha = cos(pi t / 2),
sigma = sin(pi t / 2)). Because (x_t, v) is an invertible linear function of (x0, eps), a predicted velocity
also gives predictions of x0, eps and the score; the SDE sampler uses the score.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from maetok.config import TransportConfig
from maetok.device import to_device

PATHS = ("linear", "cosine")


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample time broadcasts over every token and channel. At least float32:
    a bf16 t would mix x_t at a time up to 2e-3 away from the one the model is told."""
    t = torch.as_tensor(t, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else t


def path_coefficients(t: torch.Tensor, path: str = "linear"):
    """alpha, sigma and their time derivatives at t (any shape)."""
    if path == "linear":
        one = torch.ones_like(t)
        return 1 - t, t, -one, one
    if path == "cosine":
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))
    raise ValueError(f"unknown transport path {path!r}; choose one of {list(PATHS)}")


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, path: str = "linear"):
    """(x_t, v_target) for data x0, noise eps and per-sample times t of shape (B,)."""
    alpha, sigma, d_alpha, d_sigma = path_coefficients(_per_sample(t, x0), path)
    return alpha * x0 + sigma * eps, d_alpha * x0 + d_sigma * eps


def _solve(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str):
    # [x; v] = [[alpha, sigma], [alpha', sigma']] [x0; eps]; invert the 2x2 system.
    alpha, sigma, d_alpha, d_sigma = path_coefficients(_per_sample(t, x), path)
    det = alpha * d_sigma - sigma * d_alpha          # 1 for linear, pi/2 for cosine: never zero
    return (d_sigma * x - sigma * v) / det, (alpha * v - d_alpha * x) / det


def velocity_to_x0(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    return _solve(v, x, t, path)[0]


def velocity_to_eps(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    return _solve(v, x, t, path)[1]


def velocity_to_score(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """grad log p_t(x) = -E[eps | x_t] / sigma(t); linear path: -((1 - t) v + x) / t. Undefined at t = 0."""
    sigma = path_coefficients(_per_sample(t, x), path)[1]
    return -velocity_to_eps(v, x, t, path) / sigma


def sample_time(n: int, cfg: TransportConfig, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """n training times in [0, 1): uniform, or log-normal = sigmoid(N(mean, std)) (SD3), which favours mid t."""
    gen_device = generator.device if generator is not None else device
    if cfg.time_sampling == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    elif cfg.time_sampling == "lognormal":
        normal = torch.randn(n, generator=generator, device=gen_device)
        t = torch.sigmoid(cfg.lognormal_mean + cfg.lognormal_std * normal)
    else:
        raise ValueError(f"unknown time_sampling {cfg.time_sampling!r}; choose uniform or lognormal")
    return to_device(t, device)


def training_loss(model, x0: torch.Tensor, y: torch.Tensor | None, cfg: TransportConfig,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Flow-matching loss on a batch of clean latents x0 (B, L, C).

    loss = mse(v, v_target) + cos_loss_weight * cos, with cos = mean over tokens of 1 - cos(v, v_target) along
    the channel axis (LightningDiT's velocity-direction term). `cos` is always returned, as a diagnostic.
    """
    if x0.dtype in (torch.bfloat16, torch.float16):
        x0 = x0.float()  # x_t and the target in float32; autocast still runs the model in low precision
    gen_device = generator.device if generator is not None else x0.device
    t = sample_time(x0.shape[0], cfg, generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t, v_target = interpolate(x0, eps, t, cfg.path)
    v = model(x_t, t, y)
    if v.shape != x0.shape:
        raise ValueError(f"model returned shape {tuple(v.shape)} for input {tuple(x0.shape)}; expected the same")
    v, v_target = v.float(), v_target.float()  # loss in float32 even under bf16 autocast
    mse = (v - v_target).pow(2).mean()
    cos = (1 - F.cosine_similarity(v, v_target, dim=-1)).mean()
    loss = mse + cfg.cos_loss_weight * cos if cfg.cos_loss_weight > 0 else mse
    return {"loss": loss, "mse": mse.detach(), "cos": cos.detach()}
