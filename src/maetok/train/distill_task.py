"""Shortcut distillation as a training task: a frozen SiT teacher taught to a student that samples in 1-N steps.

The math is in diffusion/shortcut.py; this module finds the teacher and what it was trained on, builds the student
from its weights, and gives the training loop the loss (so resume, EMA, DDP and logging are the loop's).

Why shortcut models, on paper (N = the most steps, k = log2 N):

- Progressive distillation (Salimans & Ho 2022) halves the step count k times, each round a training run of its
  own, and keeps one network per step count; errors compound over the rounds, and guidance needs a second
  stage (Meng et al. 2023).
- Rectified-flow reflow (Liu et al. 2022; InstaFlow) retrains on (noise, sample) pairs that the teacher's full
  ODE solve produced: many teacher forwards per pair and a large synthetic set before training starts, and the
  straightened flow still wants a few steps or a further distillation for one.
- Consistency distillation (Song et al. 2023; LCM) maps every point of a trajectory to its end in one jump; its
  multi-step sampling re-noises between jumps, so more steps need not mean better samples, and it is set up for
  the EDM parameterisation (boundary conditions c_skip / c_out), not a velocity model.
- Shortcut models (Frans et al. 2024) tell the network the step size d and train it to be self-consistent: two
  steps of d equal one of 2d. One network serves every step count 1, 2, ..., N, deterministically; it is a
  velocity model with one more input, so it starts as the teacher (the step embedding is zero); its targets
  are plain forwards (the teacher once, or the student twice without gradient).
- MeanFlow (Geng et al. 2025) learns the average velocity over any interval through the identity
  u = v - (t - r) du/dt, whose total derivative is a Jacobian-vector product through the whole network:
  forward-mode autodiff through attention, which fused attention kernels and torch.compile support poorly, at
  about twice a forward's memory.

Shortcut models are chosen: one network for every step count up to 2^k, native to flow matching (our time
convention, velocity output, the teacher's weights as the start), no JVP, cheap targets, and the teacher's
classifier-free guidance folded into the base targets, so a student step is one forward instead of two.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError, DiffusionRunConfig, from_dict, load_yaml, without_validation
from ..config.distill import DistillConfig, DistillRunConfig
from ..data.images import save_image_grid
from ..diffusion.samplers import sample
from ..diffusion.shortcut import shortcut_loss, student_sample_config
from ..diffusion.sit import SiT
from ..io.pretrained import CONFIG_FILE, load_sit, save_pretrained
from ..io.rundir import read_run_marker
from .diffusion_task import LatentTask

log = logging.getLogger("maetok.train")

# Folded into the student when neither the config nor the teacher's run says: the sit-cpu preset's scale.
DEFAULT_CFG_SCALE = 1.5


# --------------------------------------------------------------------------------------------------------------
# The teacher and what it was trained on
# --------------------------------------------------------------------------------------------------------------
def find_teacher(path: str | Path) -> tuple[Path, Path | None]:
    """The teacher's model folder, and the diffusion run folder that trained it (None for a folder on its own):
    `path` is a model folder (e.g. a run's model/) or a diffusion run folder holding one."""
    folder = Path(path).expanduser()
    if not (folder / CONFIG_FILE).is_file() and (folder / "model" / CONFIG_FILE).is_file():
        folder = folder / "model"
    run = folder.parent
    marker = read_run_marker(run)
    trained_here = marker is not None and marker.get("run") == "diffusion" and (run / "config.yaml").is_file()
    return folder, (run if trained_here else None)


def load_teacher(path: str | Path) -> tuple[SiT, DiffusionRunConfig | None]:
    """The teacher, frozen, and the config of the run that trained it (None when there is no such run)."""
    folder, run = find_teacher(path)
    teacher = load_sit(folder).eval().requires_grad_(False)
    if teacher.is_shortcut_student:
        raise ConfigError(f"distill.teacher={path} is already a shortcut student; distil the SiT it was made from")
    run_cfg = None
    if run is not None:
        try:
            with without_validation():  # read for its data and sampling settings only
                run_cfg = from_dict(DiffusionRunConfig, load_yaml(run / "config.yaml"))
        except ValueError as e:  # ConfigError is a ValueError
            log.warning("%s: cannot read the teacher run's config (%s); its data and guidance are not used", run, e)
    return teacher, run_cfg


def with_teacher_settings(cfg: DistillRunConfig, teacher: SiT, run_cfg: DiffusionRunConfig | None):
    """The config with what it leaves open taken from the teacher's run: the data (when neither `latents` nor
    `tokenizer` is given) and the guidance to fold in (when distill.cfg_scale / cfg_interval are null)."""
    cfg = copy.deepcopy(cfg)  # keeps the config source too
    if not cfg.latents and not cfg.tokenizer:
        if run_cfg is None:
            raise ConfigError(f"distillation needs the data the teacher was trained on: give latents=DIR (its latent "
                              f"cache) or tokenizer=DIR and data.spec=...; distill.teacher={cfg.distill.teacher} is "
                              f"not inside a diffusion run folder whose config would name them")
        cfg.latents, cfg.tokenizer = run_cfg.latents, run_cfg.tokenizer
        for name in ("spec", "split", "image_size", "limit", "strict"):  # which data; how it is read stays asked
            setattr(cfg.data, name, getattr(run_cfg.data, name))
        log.info("data: the teacher run's (latents=%r, tokenizer=%r, data.spec=%r)", cfg.latents, cfg.tokenizer,
                 cfg.data.spec)
    conditional = bool(teacher.config.num_classes)
    if cfg.distill.cfg_scale is None:
        cfg.distill.cfg_scale = (run_cfg.sample.cfg_scale if run_cfg is not None else
                                 DEFAULT_CFG_SCALE if conditional else 1.0)
    if cfg.distill.cfg_interval is None:
        cfg.distill.cfg_interval = tuple(run_cfg.sample.cfg_interval) if run_cfg is not None else (0.0, 1.0)
    if cfg.distill.cfg_scale > 1 and not conditional:
        raise ConfigError(f"distill.cfg_scale={cfg.distill.cfg_scale}: guidance needs a class-conditional teacher, "
                          f"and this one is unconditional; set distill.cfg_scale=1")
    return cfg


def student_from_teacher(teacher: SiT, distill: DistillConfig) -> SiT:
    """The teacher's architecture and weights plus a zero step-size embedding: at first it predicts the teacher's
    conditional velocity at every step size."""
    cfg = replace(teacher.config, shortcut_steps=distill.max_steps, shortcut_cfg_scale=distill.cfg_scale,
                  shortcut_cfg_interval=tuple(distill.cfg_interval),
                  # No label dropout: each target is the guided velocity of the sample's own label.
                  class_dropout=0.0)
    student = SiT(cfg)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if missing != ["d_embedder.embedding_table.weight"] or unexpected:
        raise RuntimeError(f"the student does not hold the teacher's weights (missing {missing}, unexpected "
                           f"{unexpected})")
    student.transport_path = teacher.transport_path  # saved with it: `maetok sample` reads it
    return student


# --------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------
class DistillTask(LatentTask):
    def __init__(self, cfg: DistillRunConfig, device: torch.device, teacher: SiT, latent_mean: float,
                 latent_std: float, tokenizer: nn.Module | None = None):
        self.cfg, self.device = cfg, device
        self.mean, self.std = latent_mean, latent_std
        self.tokenizer = tokenizer.to(device).eval().requires_grad_(False) if tokenizer is not None else None
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.model = student_from_teacher(teacher, cfg.distill).to(device)
        student_sample_config(self.model.config, cfg.sample)  # the preview grids' settings, refused now if wrong
        self.num_classes = self.model.config.num_classes
        self.preview_labels = torch.arange(16) % self.num_classes if self.num_classes else None

    def training_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        x0, y = self.latents_from_batch(batch)
        # Self-consistency targets from the student itself (self.model: the same weights, outside DDP and
        # compilation), without gradient.
        return shortcut_loss(model, self.model, self.teacher, x0, y, self.cfg.distill, self.teacher.null_label,
                             self.teacher.transport_path)

    @torch.no_grad()
    def write_images(self, ema_model: nn.Module, step: int, out_dir: Path) -> None:
        if self.tokenizer is None:
            return
        g = torch.Generator().manual_seed(self.cfg.sample.seed)
        noise = torch.randn((16, ema_model.config.num_tokens, ema_model.config.in_channels), generator=g)
        y = self.preview_labels.to(self.device) if self.preview_labels is not None else None
        x = sample(ema_model.eval(), noise.to(self.device), y, self.cfg.sample).float()
        images = self.tokenizer.decode(x * self.std + self.mean).clamp(-1, 1)
        save_image_grid(images.cpu(), out_dir / "images" / f"samples_{step:08d}.png", nrow=8)

    def finish(self, ema_model: nn.Module, out_dir: Path) -> None:
        save_pretrained(ema_model, out_dir / "model")
