"""The pilot's data, its training stages, and the file that keeps each finished stage's result.

A stage function takes the plan (or one of its run configs) and what it works on, and returns the stage's result
record; `run_pilot` stores it in a `ResultsFile`, so that a resumed pilot skips the stages already done.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..data import DatasetError, open_dataset
from ..data.latents import cache_latents
from ..data.layout import HELD_OUT_SPLITS, SplitNotFoundError
from ..io.distributed import DistInfo, barrier
from ..io.files import atomic_write_bytes
from ..train.run import exit_status, run_diffusion, run_tokenizer
from .budgets import PilotBudget
from .plan import DataFacts, PilotPlan

log = logging.getLogger("maetok.pilot")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PEAK_RSS, PEAK_GPU = "peak_rss_gib", "peak_gpu_memory_gib"
ALREADY_TRAINED = "already trained"


class PilotInterrupted(RuntimeError):
    """A training stage stopped early (signal): nothing is recorded, and --resume continues from its checkpoint.
    `exit_code`: 128 + the signal's number (130 Ctrl-C, 143 SIGTERM), 1 for any other early stop."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------------------------
# Results of finished stages
# --------------------------------------------------------------------------------------------------------------
def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _jsonable(x: Any):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=2, default=_jsonable).encode()))


def peak_memory(device: torch.device, world: int = 1) -> dict[str, Any]:
    """Peak memory of this process (rank 0's, when several run) since it started."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out: dict[str, Any] = {PEAK_RSS: round(rss_kib / 2 ** 20, 2)}
    if device.type == "cuda":
        out[PEAK_GPU] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    if world > 1:
        out["measured_on"] = f"rank 0 of {world}"
    return out


class ResultsFile:
    """The result of each finished stage of a pilot (or of one variant), in a JSON file; a stage found there is
    not run again. `pending(key)` says whether stage `key` is still to run, `record(key, result)` stores it.

    Under torchrun, rank 0 alone writes the file, and no rank leaves `record` before all have reached it. Every
    rank reads the file when it is opened, at the same point of the pilot and before any rank may write it, so
    all ranks agree on which stages are still to run.
    """

    def __init__(self, path: Path, dist: DistInfo):
        self.path, self.dist = path, dist
        self.stages: dict[str, dict] = load_json(path)
        # Rank 0's peak memory so far, kept in the file across attempts but not among the stages (which every
        # rank must see alike).
        self.peaks = {k: self.stages.pop(k) for k in (PEAK_RSS, PEAK_GPU) if k in self.stages}
        self._started: dict[str, float] = {}
        # No rank may write the file before every rank has read it: a rank that read it after rank 0 recorded
        # a stage would skip that stage's barrier, and from then on the ranks' collectives would pair up wrongly
        # (a hang at the next training run).
        barrier(dist)

    def pending(self, key: str) -> bool:
        """Whether stage `key` is still to run; if it is, its clock starts (the result records its wall time)."""
        if key in self.stages:
            return False
        self._started[key] = time.perf_counter()
        return True

    def record(self, key: str, result: dict | None) -> dict:
        """Store the result of the pending stage `key`; None on a rank that did not run it (rank 0 alone runs
        some stages: the other ranks keep an empty record, "done" is all they need to know)."""
        started = self._started.pop(key)
        out: dict = {} if result is None else result
        if result is not None:
            out["wall_s"] = round(time.perf_counter() - started, 1)
        self.stages[key] = out
        if self.dist.is_main:
            for name, value in peak_memory(self.dist.device).items():
                if isinstance(value, float):
                    self.peaks[name] = max(value, self.peaks.get(name, 0.0))
            save_json(self.path, {**self.stages, **self.peaks})
        barrier(self.dist)
        return out


def open_variant_results(plan: PilotPlan, variant: str, dist: DistInfo) -> ResultsFile:
    folder = plan.variant_dir(variant)
    folder.mkdir(parents=True, exist_ok=True)
    barrier(dist)  # the folder exists for every rank; each reads its results.json next
    return ResultsFile(folder / "results.json", dist)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PilotData:
    train_set: Dataset
    test_set: Dataset               # the held-out split: test/, else val/
    num_classes: int

    @property
    def facts(self) -> DataFacts:
        names = [str(n).lower() for n in (getattr(self.train_set, "class_names", None) or [])]
        return DataFacts(self.num_classes, names == CIFAR10_CLASSES, len(self.train_set), len(self.test_set))


def open_pilot_data(spec: str, settings: PilotBudget) -> PilotData:
    """The training split (labelled: the pilot needs classes) and the held-out split, at the budget's sizes."""
    train_set = open_dataset(spec, split="train", image_size=settings.image_size, limit=settings.n_train)
    if not getattr(train_set, "has_labels", True):
        # One placeholder class would make a feature network that has learnt nothing, and so meaningless FIDs.
        raise DatasetError(f"{spec}: the pilot needs class labels: it trains its feature network (for FID "
                           f"on data without a pretrained one) and the linear probe on them, and conditions "
                           f"the diffusion model on them. Give labelled images (class sub-folders, or arr_1 "
                           f"in an npz); the tokenizer and diffusion commands train on unlabelled data.")
    test_set = _open_held_out(spec, settings)
    num_classes = int(getattr(train_set, "num_classes", 0) or 0)
    if len(test_set) < settings.n_eval:
        # Every metric is labelled with the count it was computed on: the held-out set's size, not n_eval.
        log.warning("held-out split has %d images, fewer than n_eval=%d: reference statistics, gFID samples "
                    "and rFID all use %d", len(test_set), settings.n_eval, len(test_set))
    log.info("pilot data: %s, %d train / %d held-out images, %d classes", spec, len(train_set), len(test_set),
             num_classes)
    return PilotData(train_set, test_set, num_classes)


def _open_held_out(spec: str, settings: PilotBudget) -> Dataset:
    errors: list[DatasetError] = []
    for split in HELD_OUT_SPLITS:  # the same order as every command's held-out default (test, then val)
        try:
            return open_dataset(spec, split=split, image_size=settings.image_size, limit=settings.n_eval)
        except DatasetError as e:  # try the next split name, report both if neither works
            errors.append(e)
    if all(isinstance(e, SplitNotFoundError) for e in errors):
        # The loaders' own advice (--split ...) is for the other commands: the pilot has no --split.
        found = sorted({s for e in errors for s in e.available}) or "no split folders"
        raise DatasetError(f"{spec}: the pilot needs a held-out split, a test/ or val/ folder of class folders "
                           f"beside train/ (DIR/train/<class>/..., DIR/test/<class>/...); it found {found}")
    raise DatasetError(f"{spec}: the pilot needs a held-out split (a test/ or val/ folder beside train/): "
                       + "; ".join(dict.fromkeys(str(e) for e in errors)))


def first(dataset: Dataset, n: int) -> Subset:
    """The first `n` items of `dataset` (all of them when it is smaller)."""
    return Subset(dataset, range(min(n, len(dataset))))


def real_images(dataset: Dataset, n: int) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


# --------------------------------------------------------------------------------------------------------------
# Training and latents
# --------------------------------------------------------------------------------------------------------------
def _run_state(run_dir: Path, dist: DistInfo, resume: str | None) -> tuple[bool, str | bool]:
    """(finished, how to start the run) for a training run's folder, as every rank sees it before rank 0 creates
    anything: a folder already there holds an interrupted run, resumed from the checkpoint `resume` picks."""
    finished, started = (run_dir / "model" / "config.json").is_file(), run_dir.exists()
    barrier(dist)
    return finished, (resume or "latest") if started else False


def _finished(summary: dict, run_dir: Path) -> dict:
    """The summary's plain values, once the run finished; an early stop raises PilotInterrupted."""
    if not summary.get("finished"):
        raise PilotInterrupted(f"training in {run_dir} stopped at step {summary.get('step')} "
                               f"({summary.get('stopped_by') or 'unfinished'}); rerun with --resume to continue",
                               exit_status(summary))
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}


def train_tokenizer(config, run_dir: Path, dist: DistInfo, resume: str | None = "latest") -> dict:
    """Train a tokenizer run into `run_dir`, resuming an interrupted one there (`resume`: from which checkpoint, see
    `resume_checkpoint`); a finished one is not redone."""
    finished, resume = _run_state(run_dir, dist, resume)
    if finished:
        return {"skipped": ALREADY_TRAINED}
    return _finished(run_tokenizer(config, run_dir, resume=resume, force=False, device=dist.device.type), run_dir)


def train_diffusion(config, run_dir: Path, dist: DistInfo, resume: str | None = "latest") -> dict:
    """Train a diffusion run into `run_dir`, resuming an interrupted one there (`resume`: from which checkpoint, see
    `resume_checkpoint`); a finished one is not redone."""
    finished, resume = _run_state(run_dir, dist, resume)
    if finished:
        return {"skipped": ALREADY_TRAINED}
    return _finished(run_diffusion(config, run_dir, resume=resume, force=False, device=dist.device.type), run_dir)


def cache_variant_latents(plan: PilotPlan, variant: str, tokenizer, data: PilotData, dist: DistInfo) -> dict:
    """Both splits' latents under the variant's tokenizer; under torchrun the ranks encode alternate shards."""
    folder = plan.variant_dir(variant)
    return {"train": str(cache_latents(tokenizer, data.train_set, folder / "latents-train",
                                       flip=plan.settings.cache_flip, device=dist.device, batch_size=256, dist=dist)),
            "test": str(cache_latents(tokenizer, data.test_set, folder / "latents-test", flip=False,
                                      device=dist.device, batch_size=256, dist=dist))}


def training_log(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in a training run's log.jsonl."""
    steps, values = [], []
    log_file = run_dir / "log.jsonl"
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            entry = json.loads(line)
            if key in entry:
                steps.append(entry["step"])
                values.append(entry[key])
    return steps, values
