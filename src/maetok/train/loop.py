"""One training loop for the tokenizer (both stages) and the diffusion model.

A *task* supplies the model and the loss; the loop owns everything that must be right for every run: the run
directory, deterministic data order, AdamW with warmup + cosine, gradient clipping, EMA, bf16 autocast on GPU,
DDP, non-finite step skipping, signals, logging and exact resume.

Exact resume: the data order is a pure function of (seed, step), the learning rate a pure function of step, and
every checkpoint holds model, EMA, optimizer, step, RNG and the task's own state (e.g. the discriminator). A run
killed at any step and resumed reaches bit-identical weights on CPU.

Under DDP the global RNG is reseeded every step from (seed, step, rank): ranks draw different flips, masks, noise
and times (identical streams would repeat rank 0's draws on every rank), and a resumed run draws what it would
have. Decisions that change the control flow (skip a non-finite step, stop on a signal) are agreed across ranks,
since backward() is a collective and a rank that goes its own way deadlocks the others.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import OptimConfig, TrainConfig, dump_yaml
from .checkpoint import code_version, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_max, all_reduce_mean

log = logging.getLogger("maetok.train")


class Task:
    """What the loop trains: subclasses set `model` and implement `training_step`; the rest is optional."""
    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def training_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Forward and loss for one batch: a dict with the scalar "loss" (backpropagated) and any diagnostics."""
        raise NotImplementedError

    def after_step(self, batch: Any, step: int, outputs: dict[str, Any]) -> dict[str, float]:
        """Extra updates after the optimizer step (the GAN discriminator); returns values to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Task state that must survive a resume besides model/EMA/optimizer (e.g. the discriminator)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def write_images(self, ema_model: nn.Module, step: int, out_dir: Path) -> None:
        pass

    def finish(self, ema_model: nn.Module, out_dir: Path) -> None:
        pass


class RunDirExists(FileExistsError):
    pass


def prepare_run_dir(out: Path, resume: bool, force: bool, is_main: bool = True) -> Path:
    """An existing, non-empty run directory needs --resume (continue) or --force (wipe); never overwritten silently."""
    out = Path(out)
    if not is_main:
        # Rank 0 alone checks and prepares: checking here too races with it (a fresh directory already holds
        # rank 0's train.log when another rank looks, and was refused as "already exists").
        return out
    if out.exists() and any(out.iterdir()):
        if resume:
            return out
        if not force:
            raise RunDirExists(f"run directory {out} already exists; pass --resume to continue it or --force "
                               f"to delete it and start over")
        if is_main:
            shutil.rmtree(out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# Deterministic data order
# --------------------------------------------------------------------------------------------------------------
class StepBatchSampler(Sampler[list[int]]):
    """Infinite batches whose content depends only on (seed, step): epoch e is a fixed permutation.

    Each rank takes its contiguous share of the global batch, so one process with batch B and N processes with
    B/N each see exactly the same images in the same step.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0,
                 world: int = 1):
        if num_items < global_batch:
            raise ValueError(f"dataset has {num_items} items, fewer than the global batch size {global_batch}")
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        self.n, self.batch, self.seed, self.start = num_items, global_batch, seed, start_step
        self.rank, self.world = rank, world
        self.per_epoch = num_items // global_batch

    def batch_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        glob = perm[pos * self.batch:(pos + 1) * self.batch]
        share = self.batch // self.world
        return glob[self.rank * share:(self.rank + 1) * share].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.batch_indices(step)
            step += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs it for len(loader)
        return sys.maxsize


# --------------------------------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------------------------------
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
    decay, no_decay = [], []
    for p in params:
        (decay if p.dim() >= 2 and p.numel() > 0 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel for the whole update on GPU instead of several per parameter.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


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


def uses_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def is_compile_error(e: Exception) -> bool:
    """Whether `e` came from torch.compile (backend, lowering, unsupported op) rather than from the model."""
    module = type(e).__module__
    return "dynamo" in module or "inductor" in module or "compile" in str(e).lower()


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, task: Task, train_cfg: TrainConfig, dataset: Dataset, out_dir: Path, run_config: Any,
                 dist_info: DistInfo, collate=None, num_workers: int = 0):
        self.task, self.cfg, self.dataset, self.out = task, train_cfg, dataset, Path(out_dir)
        self.num_workers = num_workers
        self.run_config, self.dist = run_config, dist_info
        self.collate = collate
        self.model = task.model
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params = [p for p in task.trainable_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, train_cfg.optim)
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.stop_requested: str | None = None
        self.ddp_model = self.model
        if dist_info.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
        self.forward_model = self.ddp_model
        if train_cfg.compile and can_compile():
            self.forward_model = torch.compile(self.ddp_model)
        self._compiled = self.forward_model is not self.ddp_model

    # ----- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": f"warmup+{self.cfg.optim.schedule}", "step": self.step},
            "task": self.task.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "data_position": {"step": self.step, "seed": self.cfg.seed, "global_batch": self.cfg.batch_size},
            "counters": {"skipped_steps": self.skipped_steps},
            "config": dump_yaml(self.run_config),
            "code_version": code_version(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.task.load_state_dict(state["task"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("counters", {}).get("skipped_steps", 0))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])

    def save(self, name: str | None = None) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.out / "checkpoints", self.step, self.state_dict(), self.cfg.keep_last, name)

    def try_resume(self) -> bool:
        ckpt = latest_checkpoint(self.out / "checkpoints")
        if ckpt is None:
            return False
        # Read on the CPU: RNG states must stay CPU byte tensors; modules and optimizer copy to their device.
        self.load_state_dict(load_checkpoint(ckpt, map_location="cpu"))
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    # ----- running --------------------------------------------------------------------------------------------
    def _loader(self) -> Iterator[Any]:
        sampler = StepBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.step,
                                   self.dist.rank, self.dist.world)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=self.dist.device.type == "cuda", collate_fn=self.collate,
                            persistent_workers=self.num_workers > 0,
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        return iter(loader)

    def _install_signals(self):
        def handler(signum, frame):
            self.stop_requested = signal.Signals(signum).name
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return previous

    def _set_lr(self) -> float:
        factor = lr_factor(self.step, self.cfg.steps, self.cfg.optim)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.optim.lr * factor
        return self.cfg.optim.lr * factor

    def fit(self) -> dict[str, Any]:
        """Train until cfg.steps (or a signal). Returns a summary; writes logs, images and checkpoints."""
        cfg, dev = self.cfg, self.dist.device
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(dump_yaml(self.run_config))
        previous = self._install_signals() if _in_main_thread() else {}
        batches = self._loader()
        log_f = open(self.out / "log.jsonl", "a") if self.dist.is_main else None
        progress = _progress(cfg.steps, self.step, self.dist.is_main)
        t_last, n_last = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                batch = _to_device(next(batches), dev)
                lr = self._set_lr()
                if self.dist.enabled:
                    torch.manual_seed(rank_step_seed(cfg.seed, self.step, self.dist.rank))
                self.model.train()
                with autocast_for(dev, cfg.precision):
                    out = self._forward(batch)
                loss = out["loss"]
                self.optimizer.zero_grad(set_to_none=True)
                finite = bool(torch.isfinite(loss))
                if self.dist.enabled:  # every rank must take the same branch: backward() is a collective
                    finite = all_reduce_max(float(not finite), self.dist) == 0
                if finite:
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip or float("inf"))
                    finite = bool(torch.isfinite(gnorm))
                if not finite:
                    self._skip_step(out)
                    continue
                self.bad_steps = 0
                self.optimizer.step()
                ema_update(self.ema, self.model, ema_decay_at(self.step, cfg.ema_decay))
                extra = self.task.after_step(batch, self.step, out)
                self.step += 1
                n_last += _batch_size(batch) * self.dist.world
                progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - t_last
                    record = {"step": self.step, "lr": lr, "grad_norm": float(gnorm),
                              "images_per_s": n_last / max(dt, 1e-9), **_scalars(out), **extra}
                    record = {k: (float(all_reduce_mean(torch.tensor(v), self.dist)) if k.startswith("loss") else v)
                              for k, v in record.items()}
                    if log_f:
                        log_f.write(json.dumps(record) + "\n")
                        log_f.flush()
                    progress.set_postfix(loss=f"{record['loss']:.4f}", ips=f"{record['images_per_s']:.1f}")
                    t_last, n_last = time.perf_counter(), 0
                if self.dist.is_main and (self.step % cfg.image_every == 0 or self.step == cfg.steps):
                    self.task.write_images(self.ema, self.step, self.out)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                if self.dist.enabled:  # a signal may reach one rank only, or ranks at different steps
                    signum = all_reduce_max(signal.Signals[self.stop_requested] if self.stop_requested else 0,
                                            self.dist)
                    self.stop_requested = signal.Signals(int(signum)).name if signum else None
                if self.stop_requested:
                    log.warning("received %s: wrote a checkpoint at step %d and stopped", self.stop_requested,
                                self.step)
                    self.save()
                    break
        finally:
            progress.close()
            if log_f:
                log_f.close()
            for s, h in previous.items():
                signal.signal(s, h)
        finished = self.step >= cfg.steps and not self.stop_requested
        if finished and self.dist.is_main:
            self.task.finish(self.ema, self.out)
        return {"step": self.step, "finished": finished, "skipped_steps": self.skipped_steps,
                "stopped_by": self.stop_requested, "world_size": self.dist.world}

    def _forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """The task's step through the compiled model; if compilation itself fails, say so and run eagerly."""
        if not self._compiled:
            return self.task.training_step(self.forward_model, batch, self.step)
        try:
            return self.task.training_step(self.forward_model, batch, self.step)
        except Exception as e:  # torch.compile raises many types (backend, lowering, unsupported ops)
            if not is_compile_error(e):
                raise
            log.warning("torch.compile failed (%s: %s); continuing eagerly", type(e).__name__, str(e)[:200])
            self.forward_model, self._compiled = self.ddp_model, False
            return self.task.training_step(self.forward_model, batch, self.step)

    def _skip_step(self, out: dict[str, Any]) -> None:
        """A non-finite loss or gradient: leave the weights alone, move on, and stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient (%s); step skipped (%d in a row)", self.step,
                    {k: v for k, v in _scalars(out).items()}, self.bad_steps)
        self.step += 1
        if self.bad_steps >= self.cfg.max_bad_steps:
            path = self.save(name=f"emergency-{self.step:08d}.pt")
            raise FloatingPointError(
                f"{self.bad_steps} consecutive non-finite steps (up to step {self.step}); the last good weights "
                f"are saved in {path}. Lower the learning rate or check the data, then resume from it.")


def rank_step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG's seed for one step of one DDP rank: well mixed, distinct for every (seed, step, rank)."""
    return int(np.random.SeedSequence([seed % 2**64, step, rank]).generate_state(1, np.uint64)[0])


def can_compile() -> bool:
    try:
        import torch._dynamo  # noqa: F401
        return True
    except Exception:  # pragma: no cover
        log.warning("torch.compile unavailable; running eagerly")
        return False


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0])


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in out.items() if isinstance(v, (torch.Tensor, float, int)) and
            (not isinstance(v, torch.Tensor) or v.numel() == 1)}
