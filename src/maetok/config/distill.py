"""The config of `maetok diffusion distill`: a SiT teacher distilled into a shortcut student (train/distill_task.py).

The student's architecture and transport path are the teacher's; data, sampling and training take the sections
of diffusion training (`schema.DiffusionRunConfig`), and `distill` holds what only distillation has.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .schema import ConfigError, DataConfig, OptimConfig, SampleConfig, TrainConfig


def is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


@dataclass
class DistillConfig:
    """What only distillation has: the teacher, the guidance folded into the student, and its step counts."""
    teacher: str = ""                   # the teacher's model folder (save_pretrained), e.g. runs/sit/model
    # Classifier-free guidance folded into the student; null: the teacher run's sample.cfg_scale and cfg_interval
    # (its config.yaml beside model/), else 1.5 on [0, 1] (no guidance for an unconditional teacher).
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    max_steps: int = 128                # the most steps the student samples in: 1, 2, 4, ..., max_steps
    base_fraction: float = 0.75         # share of each batch on the teacher's velocity; the rest self-consistency

    def validate(self, key: str) -> None:
        if not self.teacher:
            raise ConfigError(f"{key}.teacher is empty: give --teacher DIR, the teacher's model folder (e.g. "
                              f"runs/sit/model)")
        if self.max_steps < 2 or not is_power_of_two(self.max_steps):
            raise ConfigError(f"{key}.max_steps={self.max_steps} must be a power of two >= 2 (e.g. 32 or 128)")
        if not 0.0 < self.base_fraction < 1.0:
            raise ConfigError(f"{key}.base_fraction={self.base_fraction} must lie in (0, 1): the rest of each batch "
                              f"trains the self-consistency that gives the larger steps")
        if self.cfg_scale is not None and self.cfg_scale < 1:
            raise ConfigError(f"{key}.cfg_scale={self.cfg_scale} must be >= 1 (1 = no guidance)")
        if self.cfg_interval is not None and not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0:
            raise ConfigError(f"{key}.cfg_interval={list(self.cfg_interval)} must satisfy 0 <= low <= high <= 1")


@dataclass
class DistillRunConfig:
    """`latents` / `tokenizer` / `data` as for diffusion training (both empty: the teacher run's); `sample` draws
    the preview grids with the student."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(sampler="euler", steps=1))
    tokenizer: str = ""
    latents: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(ema_decay=0.999, optim=OptimConfig(
        lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, schedule="constant")))

    def validate(self, key: str) -> None:
        steps = self.sample.steps
        if not is_power_of_two(steps) or steps > self.distill.max_steps:
            raise ConfigError(f"sample.steps={steps}: the student draws the preview grids, in a power-of-two "
                              f"number of steps up to distill.max_steps={self.distill.max_steps}")
