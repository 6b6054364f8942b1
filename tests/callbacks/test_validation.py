"""ValidateLastStep: a run whose trainer.max_steps is below (or not a multiple of) val_check_interval still
validates at its last step, once, so its summary has a before and an after. (On the interval it is the
same single validation: tests/train/test_command.py, the 8-step run validated every 4 steps.)"""

from __future__ import annotations

from helpers.training import compose_train
from herd.scalars import read_scalars
from herd.train import train


def test_a_run_shorter_than_the_validation_interval_validates_at_its_last_step(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.max_steps=3", "trainer.val_check_interval=50",
                        "callbacks.text_samples=null", "export=false", "stage.scheduler.warmup_steps=1")
    result = train(cfg)
    assert result["trainer"].global_step == 3
    steps = [s.step for s in read_scalars(tmp_path / "logs" / "run" / "tensorboard")["val/loss"]]
    assert steps == [0, 2]  # validate_first, then the last step (Lightning logs step 3 at index 2), once
    start, end = result["start"]["val/loss"], result["metrics"]["val/loss"]
    assert end < start  # three steps of a uniform guess at lr 3e-3 lower the loss
