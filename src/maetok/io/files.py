"""Files that are never half-written: atomic writes (temporary file, fsync, rename), safetensors through them, and
the code version recorded beside what is written."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save

from ..version import __version__


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write_fn, before_rename=None) -> None:
    """Write through `write_fn(file)` into a temporary file, fsync it, rename over `path`, fsync the folder.
    `before_rename()` runs once the data is on disk and before `path` appears (a checkpoint's digest is written
    there, so that no checkpoint is ever in place without it); if it raises, `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, but atomic (temporary file, fsync, rename) and with the permissions the
    umask gives (save_file creates its files 0600, unreadable to the rest of a group sharing the results)."""
    data = save(tensors, metadata=metadata)
    atomic_write_bytes(Path(path), lambda f: f.write(data))


def code_version() -> str:
    """git describe of the source tree when available (recorded in every checkpoint), else the package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def error_chain(error: BaseException | None) -> list[BaseException]:
    """`error`, the error it was raised from or while handling, and so on down the chain (torch.save, for one,
    wraps a full disk's OSError in a RuntimeError)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain
