"""Progress lines of long jobs (evaluation tasks, rejection sampling) and the durations they show."""

from __future__ import annotations

import math

from herd.logs import Progress, clock


def test_progress_lines_count_and_estimate():
    progress = Progress("mcq", 400, "choices", every_seconds=1e9)
    progress.update(100)
    line = progress.line(progress.start + 10.0)
    assert line == "mcq: 100/400 choices (25%) | elapsed 0:10 | ETA 0:30"
    assert "ETA" not in progress.line(progress.start + 10.0, final=True)


def test_progress_counts_tokens_for_the_rate_and_stays_quiet_when_disabled(capsys):
    progress = Progress("sampling", 8, "prompts", enabled=False)
    progress.update(2, tokens=300)
    progress.update(2)
    assert (progress.done, progress.tokens) == (4, 300)
    assert progress.line(progress.start + 10.0) == "sampling: 4/8 prompts (50%) | 30 tok/s | elapsed 0:10 | ETA 0:10"
    assert progress.close() >= 0 and capsys.readouterr().out == ""


def test_clock_writes_minutes_and_hours():
    assert [clock(s) for s in (0, 9.6, 61, 3600 + 62)] == ["0:00", "0:10", "1:01", "1:01:02"]
    assert clock(math.inf) == "?"
