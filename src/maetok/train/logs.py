"""The training runs' logging: to stderr, and to the run folder's train.log once it exists."""
from __future__ import annotations

import logging
from pathlib import Path


def setup_logging(out_dir: Path | None = None, is_main: bool = True,
                  earlier: list[logging.LogRecord] = ()) -> logging.FileHandler | None:
    """Log to stderr, and (main process, `out_dir` given) to `<out_dir>/train.log`, starting with `earlier`.
    Returns the file handler, for the caller to remove when the run ends."""
    root = logging.getLogger("maetok")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if out_dir is not None and is_main:
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
                h.close()
        # Names from the file system may hold bytes that are not UTF-8: escaped, never a logging error.
        fh = logging.FileHandler(Path(out_dir) / "train.log", encoding="utf-8", errors="backslashreplace")
        fh.setFormatter(fmt)
        for record in earlier:
            fh.handle(record)
        root.addHandler(fh)
        return fh
    return None


class LogBuffer(logging.Handler):
    """Keeps the records logged before the run directory exists (it is made only once the setup succeeded)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
