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


def test_the_training_bar_in_a_log_file_does_not_redraw_for_every_logged_step(tmp_path, capsys, monkeypatch):
    """log_every=1 over 20 steps, stderr a file: the loss shown in the bar waits for the bar's own redraws
    (start and end here), instead of forcing one per logged step."""
    from test_resume import _toy_trainer

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    _toy_trainer(tmp_path, 20).fit()
    bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("train")]
    assert 1 <= len(bar) <= 3, bar
