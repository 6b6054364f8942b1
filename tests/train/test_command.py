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


def herd_train(log_dir: Path, run_dir: Path | None, *overrides: str, data_dir: Path | None = None,
               command: tuple[str, ...] = ("-m", "herd.train")):
    """Run the command with stdout and stderr redirected to files, as under sbatch or nohup
    (``command``: ``-m herd train`` runs it as the herd command's subcommand)."""
    run = [f"hydra.run.dir={run_dir}"] if run_dir else []
    cmd = [sys.executable, *command, *[o for o in small_overrides(data_dir) if o not in QUIET],
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
    names = [info.name.tag for info in data["experiment"].experiment.metric_infos]
    assert {"val/loss", "val/perplexity", "train/loss"} <= set(names)
    # TensorBoard shows the first 5 metric columns until others are ticked: val/loss, then the val metrics
    validation = [name for name in names if name.startswith("val/")]
    assert names[0] == "val/loss" and names[:len(validation)] == validation and len(validation) >= 3
    scalars = events.Tags()["scalars"]
    assert "val/loss" in scalars and "epoch" not in scalars  # the hparams metric reads the val/loss scalar
    assert events.Scalars("val/loss")[-1].step == STEPS - 1  # the last validation (Lightning counts from 0)
    # before training, and every 4 steps: the last step is on the interval and validated once
    assert [e.step for e in events.Scalars("val/loss")] == [0, 3, 7]


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
    # `herd train debug=fast` (python -m herd train: the console script's main without its installation)
    status, stdout, stderr = herd_train(tmp_path, None, "debug=fast", data_dir=prepared_corpus,
                                        command=("-m", "herd", "train"))
    assert status == 0, stderr[-3000:]
    run_dir, = (tmp_path / "pretrain" / "debug").iterdir()  # the smoke test's own folder
    assert stdout.count("herd: training finished.") == 1
    assert "herd: training finished." in (run_dir / "train.log").read_text()  # Hydra's job name: train
    assert (run_dir / "export" / "config.json").is_file()
    assert not (tmp_path / "pretrain" / "runs").exists()
    assert not list(tmp_path.rglob("*.ckpt"))
    status, stdout, stderr = herd_train(tmp_path, None, "resume=auto", "trainer.max_steps=1", "export=false",
                                        "validate_first=false", "callbacks.text_samples=null",
                                        data_dir=prepared_corpus)
    assert status == 0, stderr[-3000:]
    assert "resume=auto: no complete last.ckpt" in stdout


FULL_DISK = Path(__file__).parents[1] / "helpers" / "full_disk.py"


@pytest.mark.slow
@pytest.mark.parametrize(("fills", "written"), [("checkpoint:2", "checkpoints/last.ckpt"), ("export:1", "export")])
def test_a_full_disk_leaves_failed_a_one_line_reason_and_the_previous_checkpoint(tmp_path, prepared_corpus, fills,
                                                                                 written):
    """The disk fills at the second checkpoint (step 4), or while the export is written: exit status 1, one
    line naming "no space left on device" and the folder, in FAILED and train.log; last.ckpt of step 2
    intact; no temporary file and no empty export/ left."""
    import torch

    from herd.stages.checkpoint_io import checkpoint_metadata

    run_dir = tmp_path / "pretrain" / "runs" / "full"
    cmd = [sys.executable, str(FULL_DISK), *[o for o in small_overrides(prepared_corpus) if o not in QUIET],
           f"paths.log_dir={tmp_path}", f"hydra.run.dir={run_dir}", "trainer.max_steps=4",
           "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.best_checkpoint=null",
           "callbacks.text_samples=null", "validate_first=false", "trainer.limit_val_batches=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HERD_TEST_FULL_DISK": fills})
    assert result.returncode == 1, result.stderr[-3000:]
    target = run_dir / written
    reason = (f"herd: no space left on device while writing {target} (in {target.parent}): free space there, or "
              "give the run a folder on another disk")
    assert result.stderr.strip().splitlines()[-1].startswith(reason), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (run_dir / "FAILED").read_text().startswith(reason)
    assert reason in (run_dir / "train.log").read_text().splitlines()[-1]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_metadata(last)["global_step"] == (2 if fills.startswith("checkpoint") else 4)
    assert torch.load(last, weights_only=True)["state_dict"]  # the whole checkpoint reads back
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not (run_dir / "export").exists() and not list(run_dir.glob(".export*"))


def test_out_of_memory_and_other_failures_are_recorded_in_failed(tmp_path, capsys):
    import torch
    from omegaconf import OmegaConf

    from herd.train import _failures_recorded

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    with pytest.raises(SystemExit) as exit_status, _failures_recorded(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nMore lines from torch")
    assert exit_status.value.code == 1
    reason = "herd: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.): lower data.batch_size"
    assert capsys.readouterr().err.startswith(reason) and (tmp_path / "FAILED").read_text().startswith(reason)
    with pytest.raises(KeyError), _failures_recorded(cfg):  # a bug keeps its traceback, and is recorded too
        raise KeyError("lost")
    assert (tmp_path / "FAILED").read_text() == "herd: KeyError: 'lost'\n"
