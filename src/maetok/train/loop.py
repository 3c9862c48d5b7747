"""One training loop for the tokenizer (both stages) and the diffusion model.

A *task* supplies the model and the loss; the loop owns everything that must be right for every run: the run
directory, deterministic data order, AdamW with warmup + cosine, gradient clipping, EMA, bf16 autocast on GPU,
DDP, non-finite step skipping with rollback on divergence, signals, logging and exact resume.

Exact resume: the data order is a pure function of (seed, step), the learning rate a pure function of step, and
every checkpoint holds model, EMA, optimizer, step, RNG and the task's own state (e.g. the discriminator). A run
killed at any step and resumed reaches bit-identical weights on CPU.

Under DDP the global RNG is reseeded every step from (seed, step, rank): ranks draw different flips, masks, noise
and times (identical streams would repeat rank 0's draws on every rank), and a resumed run draws what it would
have. Decisions that change the control flow (skip a non-finite step, stop on a signal) are agreed across ranks,
since backward() is a collective and a rank that goes its own way deadlocks the others.
A run stopped by non-finite steps rolls back to its last good checkpoint (io.checkpoint.LastGoodCheckpoint).
"""
from __future__ import annotations

import copy
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import ConfigError, TrainConfig, dump_yaml
from ..io.checkpoint import (CheckpointError, LastGoodCheckpoint, load_checkpoint, remove_stale_temporaries,
                             resume_checkpoint, save_checkpoint)
from ..io.distributed import DistInfo, all_reduce_max_each, all_reduce_mean, raise_on_every_rank
from ..io.files import code_version
from ..io.rundir import trim_log
from ..progress import progress_bar
from .compiled import CompiledOrEager, autocast_for
from .optim import build_optimizer, ema_decay_at, ema_update, lr_factor, peak_lr
from .randomness import rank_step_seed
from .tracking import open_tracker

log = logging.getLogger("maetok.train")


class Task:
    """What the loop trains: subclasses set `model` and implement `training_step`; the rest is optional."""
    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def training_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Forward and loss for one batch: a dict with the scalar "loss" (backpropagated) and any diagnostics."""
        raise NotImplementedError

    def check_batch(self, batch: Any) -> None:
        """Validate a batch while it is still on the host, where reading its values costs no device sync; raise
        ValueError naming the problem."""

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

    def snapshot(self, ema_model: nn.Module, step: int, out_dir: Path) -> None:
        """Keep the model at `step` (train.snapshot_every; the last step's is the run's own model)."""


# --------------------------------------------------------------------------------------------------------------
# Deterministic data order
# --------------------------------------------------------------------------------------------------------------
def check_global_batch(num_items: int, global_batch: int, world: int) -> None:
    """A data set must hold one global batch (train.batch_size), which the processes must split evenly."""
    if num_items < global_batch:
        raise ConfigError(f"the dataset has {num_items} items, fewer than train.batch_size={global_batch}")
    if global_batch % world:
        raise ConfigError(f"train.batch_size={global_batch} is not divisible by the {world} processes")


class StepBatchSampler(Sampler[list[int]]):
    """Infinite batches whose content depends only on (seed, step): epoch e is a fixed permutation.

    Each rank takes its contiguous share of the global batch, so one process with batch B and N processes with
    B/N each see exactly the same images in the same step.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0,
                 world: int = 1):
        check_global_batch(num_items, global_batch, world)
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
# The loop
# --------------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, task: Task, train_cfg: TrainConfig, dataset: Dataset, out_dir: Path, run_config: Any,
                 dist_info: DistInfo, collate=None, num_workers: int = 0):
        self.task, self.cfg, self.dataset, self.out = task, train_cfg, dataset, Path(out_dir)
        self.run_config, self.dist, self.collate, self.num_workers = run_config, dist_info, collate, num_workers
        self.model = task.model
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params = [p for p in task.trainable_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, train_cfg.optim)
        self.step = self.bad_steps = self.skipped_steps = 0
        self.last_good = LastGoodCheckpoint(self.out / "checkpoints")  # what a divergence rolls back to
        self.signal_received: str | None = None  # set by the handler, on this rank only
        self.stop_requested: str | None = None  # the stop every rank agreed on
        self.ddp_model = self.model
        if dist_info.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
        compiled = CompiledOrEager(self.ddp_model, "the model", enabled=train_cfg.compile)
        # Eager from the start (compile off or unavailable): the model itself, one call frame fewer per step.
        self.forward_model = compiled if compiled.is_compiled else self.ddp_model

    # ----- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": f"warmup+{self.cfg.optim.schedule}", "step": self.step,
                          "base_lr": self.cfg.optim.lr},
            "task": self.task.state_dict(),
            # This process's GPU only: a state per visible GPU could not be restored with fewer visible.
            "rng": {"torch": torch.get_rng_state(),
                    **({"cuda_device": torch.cuda.get_rng_state(self.dist.device)}
                       if self.dist.device.type == "cuda" else {})},
            "data_position": {"step": self.step, "seed": self.cfg.seed, "global_batch": self.cfg.batch_size,
                              "num_items": len(self.dataset)},
            "counters": {"skipped_steps": self.skipped_steps, "bad_steps_in_a_row": self.bad_steps},
            "divergence_guard": self.last_good.state_dict(),
            "config": dump_yaml(self.run_config),
            "code_version": code_version(),
        }

    def _load_training_state(self, state: dict[str, Any]) -> None:
        """What is trained: model, EMA, optimizer and the task's own state."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        # The device decides fused / foreach (fused AdamW on a GPU), not the machine the checkpoint came from;
        # set before loading, which places each state tensor where those flags need it.
        flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        saved = state["optimizer"]
        self.optimizer.load_state_dict({**saved, "param_groups": [{**g, **f} for g, f in
                                                                  zip(saved["param_groups"], flags)]})
        self.task.load_state_dict(state["task"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_training_state(state)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("counters", {}).get("skipped_steps", 0))
        # Checkpoints are written on skipped steps too: a streak of them continues counting towards max_bad_steps.
        self.bad_steps = int(state.get("counters", {}).get("bad_steps_in_a_row", 0))
        self.last_good = LastGoodCheckpoint(self.out / "checkpoints", state.get("divergence_guard"))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if self.dist.device.type == "cuda":
            own = rng.get("cuda_device")
            if own is None and rng.get("cuda"):  # a checkpoint with one state per GPU it saw: this GPU's
                index = self.dist.device.index if self.dist.device.index is not None else torch.cuda.current_device()
                own = rng["cuda"][index] if index < len(rng["cuda"]) else None
            if own is not None:
                torch.cuda.set_rng_state(own.cpu(), self.dist.device)
        saved_items = state.get("data_position", {}).get("num_items")
        if saved_items is not None and saved_items != len(self.dataset):
            log.warning("the dataset had %d items when the checkpoint was written and has %d now: the batches "
                        "from here on are not the ones the interrupted run would have seen", saved_items,
                        len(self.dataset))

    def save(self, name: str | None = None) -> Path | None:
        self.last_good.holding(name or f"ckpt-{self.step:08d}.pt", self.step)
        path, failure = None, None
        if self.dist.is_main:
            try:
                path = save_checkpoint(self.out / "checkpoints", self.step, self.state_dict(), self.cfg.keep_last,
                                       name, keep=self.last_good.name)
            except Exception as e:  # e.g. a full disk: every rank stops with it, none waits in the next collective
                failure = e
        raise_on_every_rank(failure, self.dist, f"writing the checkpoint of step {self.step}")
        return path

    def try_resume(self, checkpoint: Path | None = None) -> bool:
        """Continue from `checkpoint`, or the newest one if it verifies (resume_checkpoint); False if there is none."""
        ckpt = checkpoint or resume_checkpoint(self.out / "checkpoints")
        if ckpt is None:
            return False
        # Read on the CPU: RNG states must stay CPU byte tensors; modules and optimizer copy to their device.
        state = load_checkpoint(ckpt, map_location="cpu")
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise ConfigError(f"{ckpt} does not fit the model built from the run's config ({type(e).__name__}: "
                              f"{str(e)[:500]}); was the checkpoint written by another run or version?") from e
        self.last_good.holding(ckpt.name, self.step)
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    # ----- running --------------------------------------------------------------------------------------------
    def _loader(self) -> Iterator[Any]:
        sampler = StepBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.step,
                                   self.dist.rank, self.dist.world)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=self.dist.device.type == "cuda", collate_fn=self.collate,
                            persistent_workers=self.num_workers > 0, worker_init_fn=_leave_stop_signals_to_main,
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        return iter(loader)

    def _install_signals(self):
        def handler(signum, frame):
            self.signal_received = signal.Signals(signum).name
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return previous

    def _set_lr(self) -> float:
        lr = peak_lr(self.cfg) * lr_factor(self.step, self.cfg.steps, self.cfg.optim)  # peak: lr x batch scaling
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def fit(self) -> dict[str, Any]:
        """Train until cfg.steps (or a signal). Returns a summary; writes logs, images and checkpoints."""
        cfg, dev = self.cfg, self.dist.device
        if self.dist.is_main:
            self._prepare_run_files()
        previous = self._install_signals() if threading.current_thread() is threading.main_thread() else {}
        batches = self._loader()
        log_f = open(self.out / "log.jsonl", "a") if self.dist.is_main else None
        self.tracker = open_tracker(cfg.tracker, self.out, self.step, self.run_config, self.dist.is_main)
        progress = progress_bar(total=cfg.steps, initial=self.step, disable=not self.dist.is_main, desc="train")
        t_last, n_last = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                batch = next(batches)
                self.task.check_batch(batch)
                batch = _to_device(batch, dev)
                lr = self._set_lr()
                if self.dist.enabled:
                    # Every random draw of a step (flips, masks, noise, times) is made by the task below, after this:
                    # training data is opened without flips, so DataLoader workers draw nothing.
                    torch.manual_seed(rank_step_seed(cfg.seed, self.step, self.dist.rank))
                self.model.train()
                with autocast_for(dev, cfg.precision):
                    out = self.task.training_step(self.forward_model, batch, self.step)
                loss = out["loss"]
                self.optimizer.zero_grad(set_to_none=True)
                # Backward runs before the loss is checked, so a step has one host sync (below) and the GPU is not
                # left idle between forward and backward. Loss and gradient norm are checked together: a
                # non-finite loss is skipped even when its gradients are finite.
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip or float("inf"))
                bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(gnorm))
                # Every rank must take the same branches: a rank's loss alone may be non-finite, and a signal may
                # reach one rank only, or ranks at different steps. Both flags (and the loss's size, the largest
                # over the ranks, for LastGoodCheckpoint) are agreed in that one sync; a signal that arrives later
                # in the step is agreed at the next one.
                local_signal = signal.Signals[self.signal_received].value if self.signal_received else 0
                bad_anywhere, agreed_signal, loss_size = all_reduce_max_each(  # float32: MPS has no float64
                    torch.stack([bad.float(), torch.full((), float(local_signal), device=bad.device),
                                 loss.detach().float().abs()]), self.dist)
                stop = signal.Signals(int(agreed_signal)).name if agreed_signal else None
                if bad_anywhere:
                    self._skip_step(out)  # no update, no log record; checkpoints, images and stops as below
                else:
                    self.last_good.finite_loss(self.step, loss_size)
                    self.bad_steps = 0
                    self.optimizer.step()
                    ema_update(self.ema, self.model, ema_decay_at(self.step, cfg.ema_decay))
                    extra = self.task.after_step(batch, self.step, out)
                    self.step += 1
                    n_last += _batch_size(batch) * self.dist.world
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        images_per_s = n_last / max(time.perf_counter() - t_last, 1e-9)
                        self._log_step(log_f, progress, lr, gnorm, images_per_s, out, extra)
                        t_last, n_last = time.perf_counter(), 0
                progress.update(1)
                self._keep_snapshot()
                saved = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps
                if saved:  # before the preview images: a failure there must not cost the steps since the last one
                    self.save()
                if self.dist.is_main and (self.step % cfg.image_every == 0 or self.step == cfg.steps):
                    self.task.write_images(self.ema, self.step, self.out)
                    self.tracker.images(self.out, self.step)
                # One process needs no agreement: a signal that arrived after the check still stops it now.
                stop = stop or (None if self.dist.enabled else self.signal_received)
                if stop:
                    self._stop(stop, saved)
                    break
        finally:
            progress.close()
            if log_f:
                log_f.close()
            self.tracker.close()
            for s, h in previous.items():
                signal.signal(s, h)
        finished = self.step >= cfg.steps and not self.stop_requested
        if finished and self.dist.is_main:
            self.task.finish(self.ema, self.out)
        return {"step": self.step, "finished": finished, "skipped_steps": self.skipped_steps,
                "stopped_by": self.stop_requested, "world_size": self.dist.world}

    def _keep_snapshot(self) -> None:
        """Before the step's checkpoint: a run killed between the two resumes before this step and writes it again."""
        every = self.cfg.snapshot_every
        if self.dist.is_main and every and self.step % every == 0 and self.step < self.cfg.steps:
            self.task.snapshot(self.ema, self.step, self.out)

    def _prepare_run_files(self) -> None:
        """Before the first step (main process): the run's config, no temporaries of a killed save, and no log
        records past the step the run continues from."""
        (self.out / "config.yaml").write_text(dump_yaml(self.run_config))
        for name in remove_stale_temporaries(self.out / "checkpoints"):
            log.warning("removed %s, left by a save that was killed", name)
        trim_log(self.out / "log.jsonl", self.step)

    def _log_step(self, log_f, progress, lr: float, gnorm: torch.Tensor, images_per_s: float,
                  out: dict[str, Any], extra: dict[str, float]) -> None:
        """One record of log.jsonl (losses averaged over the ranks, a collective every rank joins) and the
        progress bar's figures."""
        record = {"step": self.step, "lr": lr, "grad_norm": float(gnorm), "images_per_s": images_per_s,
                  **_scalars(out), **extra}
        record = {k: (float(all_reduce_mean(torch.tensor(v), self.dist)) if k.startswith("loss") else v)
                  for k, v in record.items()}
        if log_f:
            log_f.write(json.dumps(record) + "\n")
            log_f.flush()
            self.tracker.scalars(record)
        # Shown at the bar's next redraw: a forced one per record would defeat the bar's interval in a log file
        # (maetok.progress).
        progress.set_postfix(loss=f"{record['loss']:.4f}", ips=f"{record['images_per_s']:.1f}", refresh=False)

    def _stop(self, signal_name: str, saved: bool) -> None:
        """The agreed stop: every rank stops after the same step, with rank 0's checkpoint of it (unless just saved)."""
        self.stop_requested = signal_name
        if not saved:
            self.save()
        log.warning("received %s: wrote a checkpoint at step %d and stopped", signal_name, self.step)

    def _skip_step(self, out: dict[str, Any]) -> None:
        """A non-finite loss or gradient: leave the weights alone, move on, and stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient (%s); step skipped (%d in a row)", self.step,
                    {k: v for k, v in _scalars(out).items()}, self.bad_steps)
        self.step += 1
        # However short the streak, a run must not end on weights that give non-finite losses.
        ruined = self.step == self.cfg.steps and not all(bool(p.isfinite().all()) for p in self.model.parameters())
        if self.bad_steps >= self.cfg.max_bad_steps or ruined:
            raise FloatingPointError(self._stop_diverged())

    def _stop_diverged(self) -> str:
        """max_bad_steps non-finite steps in a row: roll back to the last good checkpoint, write that as this
        step's emergency checkpoint, and say what happened and what to run next."""
        streak, self.bad_steps = self.bad_steps, 0  # a run resumed from here (after a fix) counts anew
        began, lr, what = self.step - streak, self.cfg.optim.lr, f"{streak} consecutive non-finite steps"
        good = self._roll_back()
        if good is not None:
            self.skipped_steps += began - int(good["step"])  # the updates since it are undone
        path = self.save(name=f"emergency-{self.step:08d}.pt") or "the emergency checkpoint"
        if good is None:
            return (f"{what} (steps {began}-{self.step - 1}), and no checkpoint from before them to roll back to: "
                    f"{path} holds the weights as they are, which gave those losses. --resume continues from there "
                    f"if the data was at fault; if the run diverged, start it over with a lower learning rate (e.g. "
                    f"--force train.optim.lr={lr / 10:g}), or check the data.")
        good_lr = float(good.get("scheduler", {}).get("base_lr", lr))
        return (f"{what} (steps {began}-{self.step - 1}); rolled back to step {good['step']} ({self.last_good.name}), "
                f"the last checkpoint whose weights still gave a sane loss, and saved that in {path} at step "
                f"{self.step} (the batches in between are skipped). --resume continues from there: lower the "
                f"learning rate (e.g. --resume train.optim.lr={good_lr if good_lr < lr else lr / 10:g}) or the "
                f"gradient clip, or check the data.")

    def _roll_back(self) -> dict[str, Any] | None:
        """The last good checkpoint's state, loaded into model, EMA, optimizer and task (step, data position and
        RNG stay where the run stopped, past the batches of the trouble); None when there is none to load."""
        try:
            state = load_checkpoint(self.out / "checkpoints" / self.last_good.name) if self.last_good.name else None
        except CheckpointError as e:
            log.warning("cannot roll back: %s", e)
            return None
        if state is not None:
            self._load_training_state(state)
        return state


def _leave_stop_signals_to_main(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: a scheduler (Slurm's scancel, a time limit, pre-emption)
    signals every process of the job, and a worker killed by it made the main process raise instead of writing
    its checkpoint. The main process stops them when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    elif isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return int(batch.shape[0])


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in out.items() if isinstance(v, (torch.Tensor, float, int)) and
            (not isinstance(v, torch.Tensor) or v.numel() == 1)}
