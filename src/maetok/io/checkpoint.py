"""Training-state checkpoints: one file per checkpoint, written atomically, `last` pointing at the newest.

A crash mid-write leaves the previous checkpoint and `last` intact: the data goes to a temporary file that is
flushed and fsynced before an atomic rename, and `last` is itself replaced atomically afterwards.
Loading uses `torch.load(weights_only=True)`: tensors and plain containers only, nothing is executed.
Each checkpoint has a `<name>.sha256` beside it (`sha256sum -c` reads it) that loading checks: torch's zip
reader does not verify its CRCs, so a flipped byte in a tensor would otherwise load as silently wrong weights.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write_bytes

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")
# Written when too many non-finite steps in a row stop a run: the last good weights, at the step it stopped.
EMERGENCY_RE = re.compile(r"^emergency-(\d{8})\.pt$")
LAST = "last"
TMP_GLOB = ".*.tmp-*"  # atomic_write_bytes's temporary files
DIGEST_SUFFIX = ".sha256"


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep_last: int = 2,
                    name: str | None = None) -> Path:
    """Write `state` as ckpt-<step>.pt (or `name`), point `last` at it, keep the newest `keep_last`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / (name or f"ckpt-{step:08d}.pt")
    digest = hashlib.sha256()
    atomic_write_bytes(path, lambda f: torch.save(state, _HashingWriter(f, digest)))
    # Written after the checkpoint, before `last` moves: a crash in between leaves a checkpoint without its
    # digest, which loads unchecked (as checkpoints from before digests did).
    atomic_write_bytes(digest_path(path), lambda f: f.write(f"{digest.hexdigest()}  {path.name}\n".encode()))
    if name is None:
        atomic_write_bytes(ckpt_dir / LAST, lambda f: f.write(path.name.encode()))
        for old in sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))[:-keep_last]:
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


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def verify_digest(path: Path) -> None:
    """Raise ValueError when `path` no longer has the SHA-256 recorded beside it when it was written. A
    checkpoint without a digest file (written before digests, or by a save killed between the two files) passes."""
    recorded_file = digest_path(path)
    if not recorded_file.is_file():
        return
    recorded = recorded_file.read_text().split()
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if not recorded or recorded[0] != actual:
        raise ValueError(f"{path}: its bytes changed since it was written (SHA-256 {actual[:16]}..., "
                         f"{recorded_file.name} records {(recorded or ['nothing'])[0][:16]}...): the file is corrupt")


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one `last` names (the newest complete ckpt-*.pt if `last` is missing),
    or an emergency checkpoint written after it (a run stopped by non-finite steps continues from where it
    stopped, e.g. with a lower learning rate)."""
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
    """Delete the temporary files a killed save left behind (full-size, never used). Call only while holding the
    run directory: a live save's temporary file looks the same."""
    removed = []
    for tmp in Path(ckpt_dir).glob(TMP_GLOB):  # nothing for a folder that does not exist yet
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    verify_digest(Path(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be loaded as a training checkpoint ({type(e).__name__}: {e}). "
                         f"Only weights-only files are accepted; nothing is unpickled.") from e


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



