"""Training-state checkpoints: one file per checkpoint, written atomically, `last` pointing at the newest.

A crash mid-write leaves the previous checkpoint and `last` intact: the data goes to a temporary file that is
flushed and fsynced before an atomic rename, and `last` is itself replaced atomically afterwards.
Loading uses `torch.load(weights_only=True)`: tensors and plain containers only, nothing is executed.
Each checkpoint has a `<name>.sha256` beside it (`sha256sum -c` reads it) that loading checks: torch's zip
reader does not verify its CRCs, so a flipped byte in a tensor would otherwise load as silently wrong weights.
The digest is on disk before its checkpoint appears, so a checkpoint in place always has one; a checkpoint
without (its digest lost, or written before digests) cannot be verified and is refused like a corrupt one.
Resuming takes the newest checkpoint only when it verifies: otherwise it is refused, naming the newest one that
does, or (`resume_checkpoint(fallback=True)`, `--resume=verified`) falls back to that one with a warning.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write_bytes

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")
# Written when too many non-finite steps in a row stop a run: the weights it rolled back to, at the step it
# stopped (train/loop.py).
EMERGENCY_RE = re.compile(r"^emergency-(\d{8})\.pt$")
LAST = "last"
TMP_GLOB = ".*.tmp-*"  # atomic_write_bytes's temporary files
DIGEST_SUFFIX = ".sha256"
NO_DIGEST = "has no digest"  # the words naming a checkpoint that cannot be verified, in its message

log = logging.getLogger("maetok.train")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the file and what to do instead."""


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep_last: int = 2,
                    name: str | None = None, keep: str | None = None) -> Path:
    """Write `state` as ckpt-<step>.pt (or `name`), point `last` at it, and delete the older checkpoints but the
    newest `keep_last` and `keep` (the one a diverging run would roll back to)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / (name or f"ckpt-{step:08d}.pt")
    digest = hashlib.sha256()

    def commit_digest() -> None:
        # Before the checkpoint appears, and after an older file of its name is gone: however the save is
        # interrupted, a checkpoint in place has its own digest beside it.
        path.unlink(missing_ok=True)
        atomic_write_bytes(digest_path(path), lambda f: f.write(f"{digest.hexdigest()}  {path.name}\n".encode()))

    atomic_write_bytes(path, lambda f: torch.save(state, _HashingWriter(f, digest)), before_rename=commit_digest)
    if name is None:
        atomic_write_bytes(ckpt_dir / LAST, lambda f: f.write(path.name.encode()))
        for old in sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))[:-keep_last]:
            if old.name != keep:
                old.unlink()
                digest_path(old).unlink(missing_ok=True)
    return path


class _HashingWriter:
    """A write-only file that hashes what passes through it, so the digest costs no second read of the file."""

    def __init__(self, file, digest):
        self.file, self.digest = file, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


class LastGoodCheckpoint:
    """The checkpoint a run stopped by non-finite steps rolls back to (train/loop.py): the newest whose weights then
    gave a finite loss that was no spike. Weights that blew up can give finite (huge) losses for a few steps before
    non-finite ones, so the newest checkpoint is not it, and pruning keeps it (save_checkpoint's `keep`)."""
    WINDOW, SPIKE = 32, 10.0  # a loss over SPIKE times the median size of the last WINDOW ones is a spike

    def __init__(self, ckpt_dir: Path, state: dict[str, Any] | None = None):
        state = state or {}
        name = state.get("last_good_checkpoint")
        self.name: str | None = name if name and (Path(ckpt_dir) / name).is_file() else None
        self.recent = collections.deque(state.get("recent_loss_sizes", ()), maxlen=self.WINDOW)
        self._holding: tuple[str, int] | None = None  # the checkpoint holding the current weights, and its step

    def holding(self, name: str, step: int) -> None:
        """Checkpoint `name` holds the weights of step `step` (just saved, or resumed from)."""
        self._holding = (name, step)

    def finite_loss(self, step: int, size: float) -> None:
        """Step `step`'s weights gave a finite loss of absolute value `size`. Unless it is a spike, the checkpoint
        holding them (if any) becomes the last good one; it joins the window either way, so that a loss that
        stays high becomes the norm."""
        sane = not self.recent or size <= self.SPIKE * statistics.median(self.recent)
        self.recent.append(size)
        if sane and self._holding is not None and self._holding[1] == step:
            self.name = self._holding[0]

    def state_dict(self) -> dict[str, Any]:
        return {"last_good_checkpoint": self.name, "recent_loss_sizes": list(self.recent)}


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` still has the SHA-256 recorded beside it when it was written. One
    without a digest is unverified, and refused too (after a load that says what is wrong with a file that is no
    checkpoint at all)."""
    path = Path(path)
    recorded_file = digest_path(path)
    if not recorded_file.is_file():
        _torch_load(path, "cpu")
        raise CheckpointError(f"{path}: {NO_DIGEST} ({recorded_file.name}) to verify it against (to vouch for "
                              f"it, record one: `sha256sum {path.name} > {recorded_file.name}` in its folder)")
    try:
        recorded = recorded_file.read_text().split()
        with open(path, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read to verify it ({e})") from e
    if not recorded or recorded[0] != actual:
        raise CheckpointError(f"{path}: its bytes changed since it was written (SHA-256 {actual[:16]}..., "
                              f"{recorded_file.name} records {(recorded or ['nothing'])[0][:16]}...): the file is "
                              f"corrupt")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be trusted, or None when it verifies."""
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        return str(e)
    return None


def resume_checkpoint(ckpt_dir: Path, fallback: bool = False) -> Path | None:
    """The checkpoint to resume from: the newest (latest_checkpoint) when it verifies, None when there is none.
    A newest one that does not verify is refused (CheckpointError naming the newest that does, and
    --resume=verified), or with `fallback` passed over for that one, with a warning naming what was skipped.
    When none verifies, the error says so."""
    ckpt_dir = Path(ckpt_dir)
    newest = latest_checkpoint(ckpt_dir)
    if newest is None:
        return None
    passed_over: list[tuple[Path, str]] = []
    for path in [newest, *_older_checkpoints(ckpt_dir, newest)]:
        problem = checkpoint_problem(path)
        if problem is None:
            break
        passed_over.append((path, problem))
    else:
        raise CheckpointError(_none_verifies(ckpt_dir, passed_over))
    if passed_over and not fallback:
        others = [p.name for p, _ in passed_over[1:]]
        also = f"; {', '.join(others)} cannot be trusted either" if others else ""
        delete = f"it and {', '.join(others)} to resume from" if others else "it to resume from the one before"
        raise CheckpointError(f"{passed_over[0][1]}{also}. Pass --resume=verified to resume from the newest "
                              f"checkpoint that verifies, {path.name} (step {checkpoint_step(path)}), or delete "
                              f"{delete} ({path.name})")
    if passed_over:
        log.warning("--resume=verified: %s; resuming from %s (step %d), the newest checkpoint that verifies",
                    "; ".join(p for _, p in passed_over), path.name, checkpoint_step(path))
    return path


def _none_verifies(ckpt_dir: Path, problems: list[tuple[Path, str]]) -> str:
    # Each by name and the gist of its problem: the folder and the digests would repeat on every one.
    listing = "; ".join(f"{path.name}: {problem[len(str(path)) + 2:].split(' (')[0]}" for path, problem in problems)
    vouch = next((f"; or vouch for {path.name}, which only lacks its digest: `sha256sum {path.name} > "
                  f"{digest_path(path).name}` in that folder" for path, problem in problems
                  if problem.startswith(f"{path}: {NO_DIGEST}")), "")
    return (f"no checkpoint in {ckpt_dir} verifies ({listing}): there is nothing to resume from safely; start over "
            f"with --force (deletes the run) or in another --out{vouch}")


def _older_checkpoints(ckpt_dir: Path, newest: Path) -> list[Path]:
    """The checkpoints to fall back on from `newest`, newest first: a fallback never goes past the checkpoint
    `last` names (a newer file is one whose save was killed before `last` moved)."""
    step = checkpoint_step(newest)
    older = [p for p in ckpt_dir.iterdir() if p != newest and 0 <= checkpoint_step(p) <= step]
    return sorted(older, key=lambda p: (checkpoint_step(p), p.name), reverse=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint: the one `last` names (the newest complete ckpt-*.pt if `last` is missing), or an
    emergency checkpoint written after it (a run stopped by non-finite steps continues from the weights it rolled
    back to, e.g. with a lower learning rate). Not checked: resume_checkpoint decides what a run resumes from."""
    ckpt_dir = Path(ckpt_dir)
    latest = None
    pointer = ckpt_dir / LAST
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if target.is_file():
            latest = target
    if latest is None:
        found = sorted(p for p in ckpt_dir.glob("ckpt-*.pt") if CKPT_RE.match(p.name))
        latest = found[-1] if found else None
    emergency = sorted(p for p in ckpt_dir.glob("emergency-*.pt") if EMERGENCY_RE.match(p.name))
    if emergency and (latest is None or checkpoint_step(emergency[-1]) > checkpoint_step(latest)):
        return emergency[-1]
    return latest


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's file name (ckpt-00000500.pt, emergency-00000500.pt); -1 for other names."""
    match = CKPT_RE.match(path.name) or EMERGENCY_RE.match(path.name)
    return int(match.group(1)) if match else -1


def remove_stale_temporaries(ckpt_dir: Path) -> list[str]:
    """Delete the temporary files a killed save left behind (full-size, never used) and digests whose checkpoint
    never appeared. Call only while holding the run directory: a live save's files look the same."""
    ckpt_dir, removed = Path(ckpt_dir), []
    for tmp in ckpt_dir.glob(TMP_GLOB):  # nothing for a folder that does not exist yet
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    for digest in ckpt_dir.glob("*" + DIGEST_SUFFIX):
        if not digest.with_name(digest.name[:-len(DIGEST_SUFFIX)]).exists():
            digest.unlink(missing_ok=True)
            removed.append(digest.name)
    return removed


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state, once it verifies (CheckpointError otherwise)."""
    verify_checkpoint(Path(path))
    return _torch_load(Path(path), map_location)


def _torch_load(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        raise CheckpointError(f"{path}: cannot be loaded as a training checkpoint ({reason}). Only weights-only "
                              f"files are accepted; nothing is unpickled.") from e


def checkpoint_config(path: Path) -> str:
    """The run config (YAML) stored in a checkpoint, read without loading its tensors into memory (mmap)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file (mmap needs one): load_checkpoint says what is wrong with it
        state = load_checkpoint(path)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, str):
        raise ValueError(f"{path}: the checkpoint holds no run config")
    return config
