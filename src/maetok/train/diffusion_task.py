"""The diffusion model as a training task: flow matching on normalised tokenizer latents.

Batches come from a latent cache (latents, flipped latents, labels) or from images encoded online by a frozen
tokenizer. The flip choice and the noise use the main-process RNG, so they are part of the resumable state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import DiffusionRunConfig
from ..data.images import save_image_grid
from ..diffusion.labels import check_labels
from ..diffusion.samplers import sample
from ..diffusion.sit import SiT
from ..diffusion.transport import training_loss
from ..io.pretrained import save_pretrained
from .loop import Task
from .randomness import pick_flipped


def snapshot_dir(run_dir: Path, step: int) -> Path:
    """Where a diffusion run keeps its EMA model of `step` (train.snapshot_every), as a model folder."""
    return Path(run_dir) / "snapshots" / f"step-{step:08d}"


def snapshots(run_dir: Path) -> dict[int, Path]:
    """The run's finished snapshots by step, in order (a folder without its weights is a killed save)."""
    found = {int(p.name.removeprefix("step-")): p for p in Path(run_dir).glob("snapshots/step-*")
             if (p / "model.safetensors").is_file()}
    return dict(sorted(found.items()))


class LatentTask(Task):
    """A task trained on normalised tokenizer latents (diffusion training, distillation): batches from a latent
    cache (z, z_flip, y) or images encoded online by the frozen `tokenizer`, flipped on the main RNG. Subclasses
    set cfg (its data.random_flip), tokenizer, mean, std and num_classes (0: unconditional)."""
    cfg: Any
    tokenizer: nn.Module | None
    mean: float
    std: float
    num_classes: int

    def latents_from_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        flip = self.cfg.data.random_flip
        if len(batch) == 3:  # latent cache: (z, z_flip, y); pick flipped or not per item
            z, z_flip, y = batch
            if flip:
                z = pick_flipped(z, z_flip)
        else:  # images encoded online
            images, y = batch
            if flip:
                images = pick_flipped(images, images.flip(-1))
            with torch.no_grad():
                z = self.tokenizer.encode(images)
        z = (z.float() - self.mean) / self.std
        return z, (y.long() if self.num_classes else None)

    def check_batch(self, batch: Any) -> None:
        """The labels' range, on the host before the batch moves (SiT checks shapes only)."""
        if self.num_classes:
            check_labels(torch.as_tensor(batch[-1]), self.num_classes, "training labels")


class DiffusionTask(LatentTask):
    def __init__(self, cfg: DiffusionRunConfig, device: torch.device, latent_mean: float, latent_std: float,
                 tokenizer: nn.Module | None = None, num_classes: int = 0):
        self.cfg, self.device = cfg, device
        self.mean, self.std = latent_mean, latent_std
        self.tokenizer = tokenizer.to(device).eval().requires_grad_(False) if tokenizer is not None else None
        self.model = SiT.from_config(cfg.model).to(device)
        self.model.transport_path = cfg.transport.path  # saved with the weights (and the EMA copy's), for the SDE
        self.losses: list[tuple[int, float]] = []
        self.num_classes = cfg.model.num_classes
        self.preview_labels = torch.arange(16) % self.num_classes if self.num_classes else None

    def training_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        x0, y = self.latents_from_batch(batch)
        return training_loss(model, x0, y, self.cfg.transport)

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (n, self.cfg.model.num_tokens, self.cfg.model.in_channels)
        noise = torch.randn(shape, generator=g).to(self.device)
        y = labels.to(self.device) if labels is not None else None
        x = sample(model.eval(), noise, y, self.cfg.sample, path=self.cfg.transport.path).float()
        z = x * self.std + self.mean
        return self.tokenizer.decode(z).clamp(-1, 1)

    def write_images(self, ema_model: nn.Module, step: int, out_dir: Path) -> None:
        if self.tokenizer is None:
            return
        n = 16
        images = self.sample_images(ema_model, n, seed=self.cfg.sample.seed, labels=self.preview_labels)
        save_image_grid(images.cpu(), out_dir / "images" / f"samples_{step:08d}.png", nrow=8)

    def finish(self, ema_model: nn.Module, out_dir: Path) -> None:
        save_pretrained(ema_model, out_dir / "model")

    def snapshot(self, ema_model: nn.Module, step: int, out_dir: Path) -> None:
        save_pretrained(ema_model, snapshot_dir(out_dir, step))
