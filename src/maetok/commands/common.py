"""What the command handlers share: the one-line command-line error, the errors reported that way, and the checks
of an --out folder."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError
from ..data import DatasetError
from ..io.convert_sit import ConversionError
from ..io.hub import MissingWeightsError
from ..io.rundir import RunDirExists


class CLIError(Exception):
    """A command-line request that cannot be carried out as given (reported as one line, exit code 2)."""


# Reported as one `maetok: error:` line with exit code 2, not as a traceback: each names what to change.
REPORTED_ERRORS = (CLIError, ConfigError, DatasetError, ConversionError, MissingWeightsError, RunDirExists,
                   FileNotFoundError)


def is_main_process() -> bool:
    """Rank 0, or a run outside torchrun: the one process that prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def out_folder(out_arg: str, what: str) -> Path:
    """--out as a folder path; refused when it names a file."""
    out = Path(out_arg).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; {what} are written into a folder")
    return out


def finished_output(out_arg: str, names: tuple[str, ...], what: str, force: bool) -> None:
    """Refuse an --out that already holds this command's finished output (`names`), unless --force. It only
    reads files, so under torchrun every rank that calls it before any rank writes reaches the same decision
    (and raises together, instead of leaving the others waiting in a collective)."""
    out = out_folder(out_arg, what)
    present = [name for name in names if (out / name).exists()]
    if present and not force:
        raise CLIError(f"--out {out} already holds {what} ({', '.join(present)}); choose another --out, or pass "
                       f"--force to replace them")
