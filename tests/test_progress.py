"""Progress bars are drawn on a terminal and kept out of logs (no carriage-return redraws)."""

from __future__ import annotations

import io
import sys

from pipeline.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(total=3, desc="blocks", unit="block", progress=True) as bar:
        bar.update(3)
        assert not bar.disable
    assert "blocks" in sys.stderr.getvalue() and "\r" in sys.stderr.getvalue()


def test_no_bar_in_a_log_or_when_not_asked_for(monkeypatch):
    log = io.StringIO()  # what a job's or CI's captured stderr looks like: not a TTY
    monkeypatch.setattr(sys, "stderr", log)
    for asked in (True, False):
        with progress_bar(total=3, desc="blocks", unit="block", progress=asked) as bar:
            bar.update(3)
            assert bar.disable
    assert log.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(total=3, desc="blocks", unit="block", progress=False) as bar:
        assert bar.disable
    assert sys.stderr.getvalue() == ""
