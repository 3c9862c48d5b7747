"""Progress bars that suit both a terminal and a batch job's log file.

tqdm redraws up to ten times a second. In a terminal that is what one wants; in a Slurm log (stderr not a
terminal) each redraw is another line-sized chunk, and a day-long run writes hundreds of megabytes of them. So
off a terminal the bar redraws at most every 30 s. TQDM_MININTERVAL in the environment still wins.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

LOG_FILE_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    if "mininterval" not in kwargs and "TQDM_MININTERVAL" not in os.environ and not _stderr_is_terminal():
        kwargs["mininterval"] = LOG_FILE_INTERVAL_S
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
