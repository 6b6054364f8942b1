"""Sharded (fsdp2) checkpoints survive a SIGKILL at any moment of a save, on 2 gloo processes."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from herd.stages.checkpoint_io import checkpoint_is_complete, checkpoint_metadata, remove_stale_temporaries

LAUNCHER = Path(__file__).parents[1] / "helpers" / "kill_during_save.py"
STEPS, EVERY = 6, 2
ARGS = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=256",
        "data=synthetic", "data.seq_len=64", "data.batch_size=4", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "trainer.enable_model_summary=false", "callbacks.text_samples=null",
        "trainer.log_every_n_steps=1", "trainer.precision=32-true", "logger=csv", "validate_first=false",
        "stage.optimizer.lr=1e-2", f"stage.scheduler.total_steps={STEPS}", "stage.scheduler.warmup_steps=2",
        "trainer.val_check_interval=100", "callbacks.final_validation=null", f"trainer.max_steps={STEPS}",
        "strategy=fsdp2", "trainer.devices=2",
        f"callbacks.last_checkpoint.every_n_train_steps={EVERY}", "callbacks.best_checkpoint=null", "export=false"]


def train(run_dir: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """One 2-rank run; with ``kill`` it must end by that kill (see kill_during_save.py)."""
    mark = run_dir.parent / f"{run_dir.name}.killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HERD_TEST_KILL": kill or "", "HERD_TEST_KILL_MARK": str(mark)}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, str(LAUNCHER), *ARGS, f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}", *extra]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a rank left behind by a killed rank 0
    result = subprocess.CompletedProcess(cmd, process.returncode, output)
    if kill is None:
        assert process.returncode == 0, output[-4000:]
    else:
        assert mark.is_file(), f"the run was not killed at {kill}:\n{output[-4000:]}"
    return result


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_dir)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(STEPS))
    return curve


def assert_resumes(run_dir: Path, step: int, reference: dict[int, float]) -> None:
    """``last.ckpt`` is complete at ``step`` and a run resumed from it logs the reference losses."""
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_is_complete(last)
    assert checkpoint_metadata(last)["global_step"] == step
    resumed = run_dir.parent / "resumed"
    train(resumed, f"ckpt_path={last}")
    after = losses(resumed)
    assert sorted(after) == list(range(step, STEPS))
    for s, loss in after.items():
        assert loss == pytest.approx(reference[s], rel=1e-4), s


@pytest.mark.slow
def test_kill_during_the_first_save_leaves_nothing_that_looks_like_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, kill="shard1:1")
    checkpoints = run_dir / "checkpoints"
    leftovers = list(checkpoints.iterdir())
    assert leftovers and all(".tmp-" in p.name for p in leftovers)  # the shards went to a temporary folder
    assert not any(checkpoint_is_complete(p) for p in leftovers)
    assert sorted(remove_stale_temporaries(checkpoints)) == sorted(leftovers)
    assert list(checkpoints.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(("kill", "survivor_step"), [
    ("shard1:2", EVERY),  # rank 1 dies while writing its shards of the second save
    ("publish:2", EVERY),  # every shard written, nothing published yet
    ("swap:2", EVERY),  # the previous checkpoint moved aside, the new one not yet in place
    ("delete_old:1", 2 * EVERY),  # the new one published, the previous one half deleted
])
def test_kill_during_a_later_save_keeps_a_checkpoint_that_resumes(tmp_path, reference, kill, survivor_step):
    run_dir = tmp_path / "run"
    train(run_dir, kill=kill)
    checkpoints = run_dir / "checkpoints"
    if kill.startswith("swap"):  # killed between the renames: only the moved-aside copy is complete
        assert not (checkpoints / "last.ckpt").exists()
        assert [checkpoint_is_complete(p) for p in checkpoints.glob("last.ckpt.old-*")] == [True]
    remove_stale_temporaries(checkpoints)  # what the train entry point does before it resumes
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert_resumes(run_dir, survivor_step, reference)
