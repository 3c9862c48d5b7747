"""Samplers for velocity models, integrating from t = 1 (noise) to t = 0 (data), with the official conventions:

- the state x is float64 between steps (float32 on Apple's MPS, which has none); the model sees x and t cast to
  its own dtype (float32 normally) and its output is cast back; the returned sample is float64;
- ODE grid linspace(1, 0, steps + 1); SDE grid linspace(1, t_min, steps) followed by 0, all float64;
- classifier-free guidance when cfg_scale > 1 and low <= t_cur <= high (both inclusive): one model call on the
  doubled batch [x; x] with labels [y; null], then v = v_uncond + scale * (v_cond - v_uncond) on every channel
  of every token;
- Heun's second evaluation reuses the guidance decision taken at t_cur; its correction is skipped on the last
  step (plain Euler there);
- Euler-Maruyama: diffusion w = 2 t, drift v - w/2 * score, guidance combines drifts, last step deterministic;
- a shortcut student (SiTConfig.shortcut_steps > 0) takes the Euler update on the same grid, one call per step
  told the step size d = 1/steps, with no unconditional branch (its guidance is folded in); `sample` picks it.

Call these under the model's eval() mode: training-mode label dropout would corrupt the conditional branch.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from maetok.config import SampleConfig
from maetok.diffusion.labels import check_labels
from maetok.diffusion.shortcut import student_sample_config
from maetok.diffusion.transport import velocity_to_score
from maetok.progress import progress_bar

NoiseFn = Callable[[int, torch.Size], torch.Tensor]


def _input_dtype(model, noise: torch.Tensor) -> torch.dtype:
    """The dtype the model is fed: its parameters' dtype, or the noise dtype for parameter-free callables."""
    params = getattr(model, "parameters", None)
    for p in (params() if params else ()):
        if p.is_floating_point():
            return p.dtype
    return noise.dtype


def _guided(t_cur: float, cfg_scale: float, cfg_interval: tuple[float, float]) -> bool:
    low, high = cfg_interval
    return cfg_scale > 1.0 and low <= t_cur <= high


def _call(model, x: torch.Tensor, t_cur: float, y, null_label, guided: bool, dtype: torch.dtype):
    """Raw float64 model output at (x, t_cur), on [x; x] with labels [y; null] when guided; also its inputs."""
    if guided:
        x = torch.cat([x, x])
        y = torch.cat([y, torch.full_like(y, null_label)])
    t = torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device)
    out = model(x.to(dtype), t.to(dtype), y).to(x.dtype)
    return out, x, t


def _combine(out: torch.Tensor, guided: bool, cfg_scale: float) -> torch.Tensor:
    if not guided:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _prepare(model, noise, y, cfg_scale, null_label):
    """Checks made once per run (guidance settings, the labels' shape and range); returns the state at t = 1 in
    the state dtype, the model's input dtype and the null label."""
    if getattr(model, "training", False):
        warnings.warn("sampling a model in training mode (label dropout is active); call model.eval() first",
                      stacklevel=3)
    if cfg_scale > 1.0:
        if y is None:
            raise ValueError(f"cfg_scale={cfg_scale} > 1 needs class labels y; an unconditional model samples with "
                             f"cfg_scale <= 1")
        null_label = null_label if null_label is not None else getattr(model, "null_label", None)
        if null_label is None:
            raise ValueError("classifier-free guidance needs null_label (the model's unconditional label)")
    if y is not None and (y.dim() != 1 or y.shape[0] != noise.shape[0]):
        raise ValueError(f"labels y must have shape ({noise.shape[0]},) to match the noise batch; got "
                         f"{tuple(y.shape)}")
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if y is not None and isinstance(num_classes, int) and num_classes > 0:
        check_labels(y, num_classes, null_label=True)  # once per run: the model itself checks shapes only
    return noise.to(state_dtype(noise.device)), _input_dtype(model, noise), null_label


def state_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sampler's state, except on Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _ode_grid(steps: int) -> list[float]:
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()


def _sde_grid(steps: int, t_min: float) -> list[float]:
    """linspace(1, t_min, steps), then 0 for the deterministic last step."""
    return torch.linspace(1, t_min, steps, dtype=torch.float64).tolist() + [0.0]


@torch.no_grad()
def _ode(model, noise, y, steps, cfg_scale, cfg_interval, null_label, heun, progress):
    x, dtype, null_label = _prepare(model, noise, y, cfg_scale, null_label)
    t_grid = _ode_grid(steps)
    for i in progress_bar(range(steps), desc="heun" if heun else "euler", disable=not progress):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        guided = _guided(t_cur, cfg_scale, cfg_interval)
        d_cur = _combine(_call(model, x, t_cur, y, null_label, guided, dtype)[0], guided, cfg_scale)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            d_next = _combine(_call(model, x_next, t_next, y, null_label, guided, dtype)[0], guided, cfg_scale)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def euler_ode(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 50,
              cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
              null_label: int | None = None, progress: bool = False) -> torch.Tensor:
    """Euler on the probability-flow ODE: steps model calls (doubled batch where guided). Returns float64."""
    return _ode(model, noise, y, steps, cfg_scale, cfg_interval, null_label, False, progress)


def heun_ode(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 50,
             cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
             null_label: int | None = None, progress: bool = False) -> torch.Tensor:
    """Heun (2nd order) on the ODE: 2 * steps - 1 model calls. Returns float64."""
    return _ode(model, noise, y, steps, cfg_scale, cfg_interval, null_label, True, progress)


@torch.no_grad()
def euler_maruyama(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 50,
                   cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
                   null_label: int | None = None, t_min: float = 0.04, path: str = "linear",
                   generator: torch.Generator | None = None,
                   noise_fn: NoiseFn | Sequence[torch.Tensor] | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE with diffusion w(t) = 2t; steps model calls, steps - 1 noise draws.

    Step i < steps - 1 adds sqrt(w) * sqrt(|dt|) * eps_i with eps_i = noise_fn(i, shape) (or noise_fn[i] for a
    list, e.g. recorded draws), else a float64 standard normal from `generator` (global RNG when None).
    """
    x, dtype, null_label = _prepare(model, noise, y, cfg_scale, null_label)
    t_grid = _sde_grid(steps, t_min)

    def draw(i: int) -> torch.Tensor:
        if noise_fn is None:
            device = generator.device if generator is not None else x.device
            return torch.randn(x.shape, generator=generator, dtype=state_dtype(torch.device(device)),
                               device=device).to(device=x.device, dtype=x.dtype)
        if callable(noise_fn):
            eps = noise_fn(i, x.shape)
        elif i < len(noise_fn):
            eps = noise_fn[i]
        else:
            raise ValueError(f"noise_fn holds {len(noise_fn)} draws but step {i} needs one ({steps - 1} in all)")
        if tuple(eps.shape) != tuple(x.shape):
            raise ValueError(f"SDE noise for step {i} has shape {tuple(eps.shape)}; expected {tuple(x.shape)}")
        return eps.to(device=x.device, dtype=x.dtype)

    for i in progress_bar(range(steps), desc="sde", disable=not progress):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        dt = t_next - t_cur
        w = 2.0 * t_cur
        guided = _guided(t_cur, cfg_scale, cfg_interval)
        v, x_in, t_in = _call(model, x, t_cur, y, null_label, guided, dtype)
        drift = _combine(v - 0.5 * w * velocity_to_score(v, x_in, t_in, path), guided, cfg_scale)
        if i < steps - 1:
            x = x + drift * dt + math.sqrt(w) * (draw(i) * math.sqrt(abs(dt)))
        else:  # the last step (t_min -> 0) is the deterministic mean
            x = x + dt * drift
    return x


@torch.no_grad()
def shortcut_euler(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 1,
                   progress: bool = False) -> torch.Tensor:
    """A shortcut student's sampler: `steps` Euler steps of size d = 1/steps from t = 1 to 0, one model call each
    with d as an input. Returns float64. The step count is checked by `sample` (student_sample_config)."""
    x, dtype, _ = _prepare(model, noise, y, 1.0, None)
    t_grid = _ode_grid(steps)
    d = torch.full((x.shape[0],), 1.0 / steps, dtype=x.dtype, device=x.device).to(dtype)
    for i in progress_bar(range(steps), desc="shortcut", disable=not progress):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        t = torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device)
        x = x + (t_next - t_cur) * model(x.to(dtype), t.to(dtype), y, d).to(x.dtype)
    return x


def shortcut_steps_of(model) -> int:
    """The most steps a shortcut student was distilled for; 0 for any other model (or a parameter-free callable)."""
    steps = getattr(getattr(model, "config", None), "shortcut_steps", 0)
    return steps if isinstance(steps, int) else 0


def forward_passes_per_sample(cfg: SampleConfig) -> int:
    """How many single-sample model evaluations `sample` spends per sample: one per call, two where guided (the
    batch is doubled). Times the forward FLOPs, plus one decode, it is what an image costs to generate."""
    if cfg.sampler == "sde":
        evaluations = [(t, 1) for t in _sde_grid(cfg.steps, cfg.sde_t_min)[:-1]]
    else:  # Euler: one call per step; Heun: a second call on every step but the last, guided as the first
        calls = 2 if cfg.sampler == "heun" else 1
        evaluations = [(t, calls if i < cfg.steps - 1 else 1) for i, t in enumerate(_ode_grid(cfg.steps)[:-1])]
    return sum(n * (2 if _guided(t, cfg.cfg_scale, tuple(cfg.cfg_interval)) else 1) for t, n in evaluations)


def sample(model, noise: torch.Tensor, y: torch.Tensor | None, cfg: SampleConfig, null_label: int | None = None,
           generator: torch.Generator | None = None, noise_fn: NoiseFn | Sequence[torch.Tensor] | None = None,
           progress: bool = False, path: str = "linear") -> torch.Tensor:
    """Run the sampler named by cfg from `noise` (the state at t = 1). Returns a float64 tensor shaped like noise.

    A shortcut student samples with `shortcut_euler` (see `student_sample_config` for the settings it takes).
    null_label defaults to `model.null_label`. The SDE draws from `generator`, or from a generator seeded with
    cfg.seed, unless noise_fn supplies the draws; `path` is the transport path used to turn velocity into score.
    """
    cfg.validate("sample")
    if shortcut_steps_of(model):
        cfg = student_sample_config(model.config, cfg)  # its folded guidance; a step count it can take
        return shortcut_euler(model, noise, y, steps=cfg.steps, progress=progress)
    common = dict(steps=cfg.steps, cfg_scale=cfg.cfg_scale, cfg_interval=tuple(cfg.cfg_interval),
                  null_label=null_label, progress=progress)
    if cfg.sampler == "euler":
        return euler_ode(model, noise, y, **common)
    if cfg.sampler == "heun":
        return heun_ode(model, noise, y, **common)
    if cfg.sampler == "sde":
        if generator is None and noise_fn is None:
            generator = torch.Generator(noise.device).manual_seed(cfg.seed)
        return euler_maruyama(model, noise, y, t_min=cfg.sde_t_min, path=path, generator=generator,
                              noise_fn=noise_fn, **common)
    raise ValueError(f"unknown sampler {cfg.sampler!r}; choose euler, heun or sde")
