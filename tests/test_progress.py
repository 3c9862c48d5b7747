"""Progress bars redraw rarely in a log file (a batch job's stderr) and as usual in a terminal."""
from __future__ import annotations

import io

from maetok import progress
from maetok.progress import LOG_FILE_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_the_bar_redraws_every_30_seconds(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval == LOG_FILE_INTERVAL_S == 30


def test_in_a_terminal_or_when_asked_the_bar_keeps_its_interval(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(progress.sys, "stderr", _Terminal())
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval == 0.1  # tqdm's own default
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    with progress_bar(range(3), file=io.StringIO(), mininterval=2) as bar:
        assert bar.mininterval == 2
    # tqdm reads its TQDM_* variables itself (once, at import): a person's choice is left to it
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval != LOG_FILE_INTERVAL_S
