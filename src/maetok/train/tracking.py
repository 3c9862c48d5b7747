"""Experiment tracking (`train.tracker`): log.jsonl's records and the preview grids, also sent to TensorBoard or
Weights & Biases, by the main process only. log.jsonl stays the record a run is read back from.

    tracker = open_tracker("tensorboard", out_dir, start_step, run_config)   # NullTracker for "none"
    tracker.scalars(record)          # the same record log.jsonl gets, at the same steps
    tracker.images(out_dir, step)    # the PNG grids the task wrote for `step`
    tracker.close()
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import ConfigError, to_dict

log = logging.getLogger("maetok.train")

TRACKERS = ("none", "tensorboard", "wandb")


class NullTracker:
    """`train.tracker=none` and processes other than rank 0: nothing is sent anywhere."""

    def scalars(self, record: dict[str, Any]) -> None:
        pass

    def images(self, out_dir: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _grids_of_step(out_dir: Path, step: int) -> list[tuple[str, np.ndarray]]:
    """(name, HWC uint8 array) of every grid the task wrote for `step` (images/<name>_<step>.png): read back from
    the files, so that the tasks need not know about trackers."""
    suffix = f"_{step:08d}.png"
    return [(path.name[: -len(suffix)], np.asarray(Image.open(path).convert("RGB")))
            for path in sorted((out_dir / "images").glob(f"*{suffix}"))]


class TensorBoardTracker(NullTracker):
    def __init__(self, out_dir: Path, start_step: int):
        # Imported here: tensorboard is an optional extra (`pip install maetok[tracking]`).
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a run resumed from the checkpoint of step S drops the events logged after S (it logs them
        # again from S + 1: a record carries the step count after its update), so each step appears once.
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step
                                    else None)

    def scalars(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def images(self, out_dir: Path, step: int) -> None:
        for name, grid in _grids_of_step(out_dir, step):
            self.writer.add_image(name, grid, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(NullTracker):
    def __init__(self, wandb: Any, out_dir: Path, run_config: Any):
        self.wandb = wandb
        # id from the folder and resume="allow": a resumed run continues the same W&B run.
        self.run = wandb.init(dir=str(out_dir), name=out_dir.name, id=_wandb_id(out_dir), resume="allow",
                              config=to_dict(run_config))

    def scalars(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def images(self, out_dir: Path, step: int) -> None:
        grids = _grids_of_step(out_dir, step)
        if grids:
            self.run.log({name: self.wandb.Image(grid) for name, grid in grids}, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(out_dir: Path) -> str:
    """W&B run ids may not hold slashes and the like: the run folder's resolved path, made safe."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in str(out_dir.resolve()).strip("/"))[-120:]


def check_tracker(name: str) -> None:
    """Before anything is built: a tracker whose package is missing is one line, not a traceback mid-run."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError:
        hint = "pip install 'maetok[tracking]'" if name == "tensorboard" else "pip install wandb"
        raise ConfigError(f"train.tracker={name} needs the {package} package, which is not installed ({hint}); "
                          f"or set train.tracker=none") from None


def open_tracker(name: str, out_dir: Path, start_step: int, run_config: Any, is_main: bool = True) -> NullTracker:
    """The tracker `train.tracker` names, for the main process; a NullTracker otherwise."""
    if not is_main or name == "none":
        return NullTracker()
    check_tracker(name)
    log.info("tracking with %s%s", name, f" in {out_dir / 'tensorboard'}" if name == "tensorboard" else "")
    if name == "tensorboard":
        return TensorBoardTracker(Path(out_dir), start_step)
    return WandbTracker(importlib.import_module("wandb"), Path(out_dir), run_config)
