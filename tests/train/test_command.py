"""``python -m herd.train`` as a user runs it: output off a terminal, train.log, TensorBoard's HPARAMS, failures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.training import small_overrides

STEPS = 8
QUIET = {"trainer.enable_progress_bar=false", "callbacks.progress_bar=null"}


def herd_train(log_dir: Path, run_dir: Path | None, *overrides: str, data_dir: Path | None = None):
    """Run the command with stdout and stderr redirected to files, as under sbatch or nohup."""
    run = [f"hydra.run.dir={run_dir}"] if run_dir else []
    cmd = [sys.executable, "-m", "herd.train", *[o for o in small_overrides(data_dir) if o not in QUIET],
           f"paths.log_dir={log_dir}", *run, *overrides]
    out, err = log_dir / "stdout.txt", log_dir / "stderr.txt"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as stdout, open(err, "w") as stderr:
        result = subprocess.run(cmd, stdout=stdout, stderr=stderr, timeout=600,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return result.returncode, out.read_text(), err.read_text()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prepared_corpus):
    log_dir = tmp_path_factory.mktemp("cli")
    run_dir = log_dir / "pretrain" / "runs" / "r1"
    status, stdout, stderr = herd_train(
        log_dir, run_dir, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4", "logger=many",
        "callbacks.progress_bar.every_n_steps=2", "callbacks.text_samples=null", data_dir=prepared_corpus)
    assert status == 0, stderr[-3000:]
    return run_dir, stdout, stderr


@pytest.mark.slow
def test_progress_lines_are_printed_when_stdout_is_a_file(finished_run):
    _, stdout, _ = finished_run
    summary = stdout.index("herd: training finished.")
    lines = re.findall(r"^step (\d+)/8 \(\d+%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tok/s \| elapsed [\d:]+ \| ETA [\d:]+$",
                       stdout[:summary], flags=re.MULTILINE)
    assert [int(step) for step in lines] == [2, 4, 6, 8]
    assert re.search(r"^validation at step 4: .*val/loss [\d.]+", stdout[:summary], flags=re.MULTILINE)
    assert stdout.count("herd: training finished.") == 1


@pytest.mark.slow
def test_train_log_holds_herds_messages(finished_run):
    run_dir, _, _ = finished_run
    text = (run_dir / "train.log").read_text()
    for message in ("validation at step 0", "step 4/8", "MFU is relative to", "herd: training finished.",
                    "val/loss 6."):
        assert message in text, message


@pytest.mark.slow
def test_tensorboard_hparams_hold_the_config_and_the_final_metrics(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _, _ = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    data = {}
    for raw in content.values():
        parsed = plugin_data_pb2.HParamsPluginData.FromString(raw)
        data[parsed.WhichOneof("data")] = parsed
    hparams = data["session_start_info"].session_start_info.hparams
    assert hparams["stage.optimizer.lr"].number_value == pytest.approx(3e-3)
    assert hparams["model.dim"].number_value == 64
    assert hparams["trainer.max_steps"].number_value == STEPS
    metrics = {info.name.tag for info in data["experiment"].experiment.metric_infos}
    assert {"val/loss", "val/perplexity", "train/loss"} <= metrics
    scalars = events.Tags()["scalars"]
    assert "val/loss" in scalars and "epoch" not in scalars  # the hparams metric reads the val/loss scalar
    assert events.Scalars("val/loss")[-1].step == STEPS - 1  # the last validation (Lightning counts from 0)


@pytest.mark.slow
def test_a_run_that_cannot_start_fails_early_and_is_marked(tmp_path, prepared_corpus):
    run_dir = tmp_path / "pretrain" / "runs" / "bad"
    status, stdout, stderr = herd_train(tmp_path, run_dir, "trainer.max_steps=0", data_dir=prepared_corpus)
    assert status == 2
    assert "herd: trainer.max_steps=0" in stderr and "Traceback" not in stderr + stdout
    assert (run_dir / "FAILED").read_text().startswith("herd: trainer.max_steps=0")
    assert "trainer.max_steps=0" in (run_dir / "train.log").read_text()
    assert not list(run_dir.rglob("events.out.tfevents.*"))  # nothing for TensorBoard to show


@pytest.mark.slow
def test_debug_fast_leaves_nothing_for_resume_auto(tmp_path, prepared_corpus):
    status, _, stderr = herd_train(tmp_path, None, "debug=fast", data_dir=prepared_corpus)
    assert status == 0, stderr[-3000:]
    assert list((tmp_path / "pretrain" / "debug").iterdir())  # the smoke test's own folder
    assert not (tmp_path / "pretrain" / "runs").exists()
    assert not list(tmp_path.rglob("*.ckpt"))
    status, stdout, stderr = herd_train(tmp_path, None, "resume=auto", "trainer.max_steps=1", "export=false",
                                        "validate_first=false", "callbacks.text_samples=null",
                                        data_dir=prepared_corpus)
    assert status == 0, stderr[-3000:]
    assert "resume=auto: no complete last.ckpt" in stdout
