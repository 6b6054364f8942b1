"""Progress in optimizer steps: the rich bar's count and total, also after a resume; the choice by terminal."""

from __future__ import annotations

import pytest

from helpers.training import compose_train
from herd.callbacks.progress import LineProgress, StepProgressBar, step_progress
from herd.train import train

RICH = ["trainer.enable_progress_bar=true", "+callbacks.progress_bar={_target_: herd.callbacks.progress.step_progress, "
        "force: rich}", "callbacks.text_samples=null", "validate_first=false", "trainer.val_check_interval=100"]


def bar_state(result):
    bar = next(c for c in result["trainer"].callbacks if isinstance(c, StepProgressBar))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    return task.completed, task.total


def test_the_bar_counts_steps_of_the_run_also_after_a_resume(tmp_path, prepared_corpus):
    first = train(compose_train(tmp_path / "a", prepared_corpus, *RICH, "trainer.max_steps=3",
                                "callbacks.last_checkpoint.every_n_train_steps=3", "export=false"))
    assert bar_state(first) == (3, 3)
    checkpoint = tmp_path / "a" / "logs" / "run" / "checkpoints" / "last.ckpt"
    resumed = train(compose_train(tmp_path / "b", prepared_corpus, *RICH, "trainer.max_steps=5",
                                  f"ckpt_path={checkpoint}", "export=false"))
    assert bar_state(resumed) == (5, 5)  # not "2/1": the batches of the resumed epoch


def test_the_display_follows_the_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(step_progress(), LineProgress)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(step_progress(), StepProgressBar)
    assert isinstance(step_progress(force="lines"), LineProgress)
    with pytest.raises(ValueError, match="force"):
        step_progress(force="bar")
