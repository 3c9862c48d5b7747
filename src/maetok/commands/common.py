"""What the command handlers share: the one-line command-line error, the exit codes and the errors reported as one
line with each, and the checks of an --out folder."""
from __future__ import annotations

import argparse
import enum
import errno
import os
from pathlib import Path

from ..config import ConfigError
from ..data import DatasetError, ImageDecodeError
from ..io.checkpoint import CheckpointError
from ..io.convert_sit import ConversionError
from ..io.export import ExportError
from ..io.files import error_chain
from ..io.hub import UnreadableFileError
from ..io.hub_upload import HubUploadError
from ..io.rundir import RunDirExists


class CLIError(Exception):
    """A command-line request that cannot be carried out as given (reported as one line, exit code 2)."""


class ExitCode(enum.IntEnum):
    """`maetok`'s exit codes, as the README's table gives them. Besides these, 128 + N: stopped by signal N (its
    checkpoint written; `train.run.exit_status`, `PilotInterrupted`)."""
    OK = 0
    BUG = 1              # an unexpected error, shown with its traceback: a bug to report
    BAD_REQUEST = 2      # the command line, the config or the input data, as the line says
    UNREADABLE_FILE = 3  # a file that is there but cannot be read or verified (corrupt checkpoint, pickle)
    DIVERGED = 4         # training stopped after train.max_bad_steps non-finite steps in a row
    CANNOT_WRITE = 5     # disk full, over quota, no permission, read-only file system


# A file that cannot be read or verified exits with 3 also when the error reported is one raised from it (a
# resumed run's saved config that cannot be read because its checkpoint cannot).
UNREADABLE_FILE_ERRORS = (UnreadableFileError, CheckpointError)
# Reported as one `maetok: error:` line, not a traceback: each message names the file or setting and what to do.
# The first class that matches decides the code, so subclasses come before their bases. MissingWeightsError is a
# FileNotFoundError, RunDirExists a FileExistsError.
REPORTED_ERRORS: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (FloatingPointError, ExitCode.DIVERGED),  # train.loop's stop, naming the emergency checkpoint
    (ImageDecodeError, ExitCode.BAD_REQUEST),  # data.strict=true, at the first unreadable image
    (CLIError, ExitCode.BAD_REQUEST), (ConfigError, ExitCode.BAD_REQUEST), (DatasetError, ExitCode.BAD_REQUEST),
    (ConversionError, ExitCode.BAD_REQUEST), (ExportError, ExitCode.BAD_REQUEST),
    (RunDirExists, ExitCode.BAD_REQUEST),
    (HubUploadError, ExitCode.BAD_REQUEST),  # a push without a token, offline or refused by the hub
    (FileNotFoundError, ExitCode.BAD_REQUEST),
)
# Errors of the file system that the user fixes outside maetok. A full disk under torch.save surfaces as torch's
# RuntimeError raised while handling the OSError, hence the search through the exception's context.
CANNOT_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
BAD_PATH_ERRNOS = {errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
STRICT_DATA_HINT = ("data.strict=true stops at the first unreadable image: replace or remove that file, or set "
                    "data.strict=false to skip unreadable images (each is logged)")


def error_report(error: BaseException, args: argparse.Namespace) -> tuple[ExitCode, str] | None:
    """(exit code, the one line to print) for an error the user can act on; None for a bug, whose traceback is
    the report."""
    if any(isinstance(e, UNREADABLE_FILE_ERRORS) for e in error_chain(error)):
        return ExitCode.UNREADABLE_FILE, str(error)
    for cls, code in REPORTED_ERRORS:
        if isinstance(error, cls):
            hint = f"; {STRICT_DATA_HINT}" if isinstance(error, ImageDecodeError) else ""
            return code, f"{error}{hint}"
    refused = next((e for e in error_chain(error) if isinstance(e, OSError) and e.errno in CANNOT_WRITE_ERRNOS), None)
    if refused is not None:
        return ExitCode.CANNOT_WRITE, file_system_refusal(refused, args)
    if isinstance(error, OSError) and error.errno in BAD_PATH_ERRNOS and error.filename:
        return ExitCode.BAD_REQUEST, f"{error.filename}: {error.strerror}; check the path"
    return None


def file_system_refusal(error: OSError, args: argparse.Namespace) -> str:
    """The line for a disk that is full or a place this user may not write, naming the file (or --out, for a write
    that failed with no file name, as a full disk does)."""
    out = getattr(args, "out", None)
    where = error.filename or (f"writing into --out {out}" if out else "writing a file")
    why = error.strerror or os.strerror(error.errno)
    if error.errno in DISK_FULL_ERRNOS:
        again = " with --resume: the checkpoints written before are kept" if hasattr(args, "resume") else ""
        return f"{where}: {why}; free some space (or choose an --out on another disk) and run again{again}"
    return f"{where}: {why}; choose another --out, or check the permissions there"


def is_main_process() -> bool:
    """Rank 0, or a run outside torchrun: the one process that prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def out_folder(out_arg: str, what: str) -> Path:
    """--out as a folder path, checked before any work: refused when it names a file or a path through one, or
    when the folder it is in (or would be made in) cannot be written."""
    out = Path(out_arg).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; {what} are written into a folder")
    nearest = next(p for p in (out, *out.parents) if p.exists())  # `exists` is False through a file
    if not nearest.is_dir():
        raise CLIError(f"--out {out}: {nearest} is a file, so no folder can be made under it; choose another --out")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(nearest))
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
