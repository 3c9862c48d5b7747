"""Run directories: decided on before anything is built, never silently overwritten, locked while in use.

A run directory holds what one training writes (config, logs, checkpoints, images, model) and a marker file
naming it as ours; --force deletes only such a directory, --resume continues it (from its newest checkpoint when
that verifies; --resume=verified from the newest that does).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from .checkpoint import resume_checkpoint
from .files import atomic_write_bytes

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

log = logging.getLogger("maetok.train")


class RunDirExists(FileExistsError):
    pass


RUN_MARKER = "maetok-run.json"
# Everything a training run writes at the top of its directory. --force deletes a directory only when it holds
# nothing else: whatever else is there was not written by us and may be someone's work.
RUN_ENTRIES = frozenset({RUN_MARKER, "config.yaml", "train.log", "log.jsonl", "checkpoints", "images", "model",
                         "tensorboard"})
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) maetok")


def read_run_marker(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(out) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == "maetok-run" else None


def looks_like_run(out: Path) -> bool:
    """Whether `out` was written by a maetok training: our marker, or (runs made before the marker existed) only
    our entries, with a config.yaml of a run config or a train.log in our format."""
    out = Path(out)
    if read_run_marker(out) is not None:
        return True
    names = {p.name for p in out.iterdir()}
    if not names or not names <= RUN_ENTRIES:
        return False
    try:
        cfg = yaml.safe_load((out / "config.yaml").read_text()) if "config.yaml" in names else None
    except (OSError, yaml.YAMLError):
        cfg = None
    if isinstance(cfg, dict) and {"model", "train"} <= set(cfg):
        return True
    if "train.log" in names and (out / "train.log").is_file():
        with open(out / "train.log", errors="replace") as f:
            first = f.readline()
        return not first or bool(_LOG_LINE.match(first))
    return False


def training_traces(out: Path) -> list[str]:
    """What in run directory `out` came from training steps (checkpoints, weights, logged steps, images)."""
    out, traces = Path(out), []
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.pt")) if (out / "checkpoints").is_dir() else []
    if ckpts:
        traces.append(f"checkpoints ({', '.join(ckpts[-3:])})")
    if (out / "model").exists():
        traces.append("model/")
    if (out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size > 0:
        traces.append("logged steps in log.jsonl")
    if (out / "images").is_dir() and any((out / "images").iterdir()):
        traces.append("images/")
    return traces


# What --resume resumes from: the newest checkpoint (refused when it does not verify), or the newest that verifies.
RESUME_MODES = ("latest", "verified")


def resume_mode(resume: bool | str | None) -> str | None:
    """--resume as a mode: None (no resume), "latest" (also True) or "verified"."""
    if resume is True:
        return "latest"
    if not resume:
        return None
    if resume not in RESUME_MODES:
        raise ConfigError(f"--resume={resume}: unknown; --resume continues from the newest checkpoint, "
                          f"--resume=verified from the newest one that verifies")
    return resume


def check_run_flags(resume: bool | str | None, force: bool) -> None:
    if resume_mode(resume) and force:
        raise ConfigError("--resume and --force contradict each other: --resume continues the run in the "
                          "directory, --force deletes it and starts over; pass one of them")


# The run directories this process holds locked, by descriptor. A flock belongs to the open file, which a forked
# child (a DataLoader worker) shares: one orphaned by a SIGKILL kept the directory locked for seconds, and a
# scheduler's immediate restart was refused as "in use". Forked children close their copies at once.
_LOCKS_HELD: dict[int, "RunDir"] = {}


def _drop_locks_in_forked_child() -> None:
    for fd, run_dir in list(_LOCKS_HELD.items()):
        os.close(fd)  # only closed: flock(LOCK_UN) would unlock the parent's lock as well
        run_dir._lock_fd = None
    _LOCKS_HELD.clear()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork and no flock
    os.register_at_fork(after_in_child=_drop_locks_in_forked_child)


class RunDir:
    """One training's run directory, decided on before anything is built and changed only after (`open`).

    Never silently overwritten: an existing run needs --resume (continue) or --force (delete and start over);
    a failed start (no checkpoint, weights, logged step or image) is reused. --force deletes only what a run
    writes, and refuses a directory holding anything else. While a training uses the directory it holds a lock
    on it (flock, which dies with the process), so a second training cannot resume, reuse or delete it under
    the first. `resume`: False, True or "latest", or "verified" (see resume_checkpoint).
    """

    def __init__(self, out: Path, resume: bool | str, force: bool, is_main: bool = True):
        check_run_flags(resume, force)
        self.out, self.resume, self.force, self.is_main = Path(out), resume_mode(resume), force, is_main
        self.action = "resume" if self.resume else "new"
        # The checkpoint a resumed run continues from: rank 0 decides, and tells the other ranks (train/run.py).
        self.checkpoint: Path | None = None
        self._lock_fd: int | None = None
        if is_main:
            # Rank 0 alone checks and prepares: checking on every rank races with it (a fresh directory already
            # holds rank 0's train.log when another rank looks, and was refused as "already exists").
            try:
                self._decide()
            except BaseException:
                self.close()
                raise

    @property
    def resuming(self) -> bool:
        """Whether the run continues from a checkpoint (`checkpoint`)."""
        return self.checkpoint is not None

    def _decide(self) -> None:
        out = self.out
        if not out.exists():
            if self.resume:
                log.warning("--resume: %s does not exist; starting a new run there", out)
            self.action = "new"
            return
        if not out.is_dir():
            raise RunDirExists(f"{out} exists and is not a directory; choose another --out")
        if not any(out.iterdir()):
            self.action = "new"
            return
        if not looks_like_run(out):
            raise RunDirExists(
                f"{out} is not empty and is not a maetok run directory (no {RUN_MARKER}; holds "
                f"{_listing(out)}); refusing to {'resume in' if self.resume else 'delete' if self.force else 'use'} "
                f"it. Choose another --out.")
        self._lock()
        traces = training_traces(out)
        if self.resume:
            self.checkpoint = resume_checkpoint(out / "checkpoints", fallback=self.resume == "verified")
        if self.checkpoint is not None:
            self.action = "resume"
        elif not traces:
            self.action = "reuse"  # a failed start: there is nothing in it to lose
        elif self.resume:
            kept = [t for t in traces if t.startswith(("checkpoints", "model"))]
            if kept:
                raise RunDirExists(f"{out} holds no checkpoint to resume from, but holds {', '.join(kept)}; pass "
                                   f"--force to delete it and start over, or choose another --out")
            log.warning("%s holds no checkpoint (only %s): nothing to resume; starting it again from step 0",
                        out, ", ".join(traces))
            self.action = "reuse"
        elif self.force:
            foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
            if foreign:
                raise RunDirExists(f"--force would delete {out}, but it holds {foreign} besides the run's own "
                                   f"files; move them out first, or choose another --out")
            self.action = "replace"
        else:
            raise RunDirExists(f"run directory {out} already exists ({', '.join(traces)}); pass --resume to "
                               f"continue it or --force to delete it and start over")

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        if fcntl is None:  # no flock on this platform: no protection against a second process
            return
        try:
            fd = os.open(self.out, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirExists(f"{self.out} is in use by another training process; wait for it to finish or "
                               f"stop it first") from None
        except OSError:  # a filesystem without flock
            os.close(fd)
            return
        self._lock_fd = fd
        _LOCKS_HELD[fd] = self

    def open(self, marker: dict[str, Any] | None = None) -> Path:
        """Make the directory ready for this run (delete, create) once everything that can fail has been built."""
        out = self.out
        if not self.is_main:
            return out
        if self.action in ("replace", "reuse"):
            log.warning("%s %s", "deleting the old run in" if self.action == "replace" else
                        "reusing the failed start in", out)
            for name in sorted(RUN_ENTRIES):
                p = out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        self._lock()
        if self.action != "resume" or read_run_marker(out) is None:
            data = {"kind": "maetok-run", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(marker or {})}
            atomic_write_bytes(out / RUN_MARKER, lambda f: f.write(json.dumps(data, indent=2).encode()))
        return out

    def close(self) -> None:
        if self._lock_fd is not None:
            _LOCKS_HELD.pop(self._lock_fd, None)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _listing(out: Path, n: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def prepare_run_dir(out: Path, resume: bool, force: bool, is_main: bool = True) -> Path:
    """Decide on and prepare `out` in one go (see RunDir); the lock is not kept."""
    run_dir = RunDir(out, resume, force, is_main)
    try:
        return run_dir.open()
    finally:
        run_dir.close()


def trim_log(path: Path, step: int) -> None:
    """Drop the records of log.jsonl past `step` (written after the checkpoint a run resumes from), so that the
    resumed run does not log those steps twice."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line cut short by a killed process
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and keep(line)]
    if len(kept) != len(lines):
        atomic_write_bytes(path, lambda f: f.write("".join(kept).encode()))
        log.info("log.jsonl: dropped %d records past step %d, the checkpoint resumed from", len(lines) - len(kept),
                 step)
