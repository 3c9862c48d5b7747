"""Optimisation helpers of the training loop: AdamW, the learning-rate schedule, and the EMA of the weights."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import OptimConfig, TrainConfig


def peak_lr(cfg: TrainConfig) -> float:
    """The learning rate the schedule scales: train.optim.lr, times global batch / lr_reference_batch when that
    is set (the official tokenizer code: lr = 1e-4 * global_batch / 256, so 2e-4 at its batch of 512)."""
    return cfg.optim.lr * batch_lr_scale(cfg)


def batch_lr_scale(cfg: TrainConfig) -> float:
    """Global batch / lr_reference_batch, or 1 when the rate is not scaled with the batch."""
    reference = cfg.optim.lr_reference_batch
    return cfg.batch_size / reference if reference else 1.0


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio (or constant). A pure function of step: resume-exact."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings and tokens (1-D or named like them)."""
    # One fused kernel for the whole update on GPU instead of several per parameter.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(weight_decay_groups(params, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             fused=fused or None)


def weight_decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices with `weight_decay`, 1-D tensors (biases, norms) without."""
    decay, no_decay = [], []
    for p in params:
        (decay if p.dim() >= 2 and p.numel() > 0 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters()]
    # One multi-tensor kernel instead of one launch per parameter (hundreds per step on GPU).
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
    ema_bufs = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_bufs[name].copy_(b)


def ema_decay_at(step: int, target: float) -> float:
    """Warm the EMA up so short runs are not dominated by the random init."""
    return min(target, (1 + step) / (10 + step))
