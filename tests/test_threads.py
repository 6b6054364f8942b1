"""herd's thread budget: torch's intra-op threads from the cores a process may use, those other processes keep
busy, the ranks sharing them and the media loader workers; trainer.threads (or OMP_NUM_THREADS) overrides;
train.py applies it before building."""

from __future__ import annotations

import os

import pytest
import torch

from helpers.training import compose_train
from herd import threads
from herd.train import ConfigError, build, thread_budget


@pytest.mark.parametrize(("cores", "environ", "devices", "workers", "expected"), [
    (2, {}, 1, 1, 1),                               # one core for a worker that decodes media
    (2, {}, 1, 0, 2),
    (16, {}, 1, 4, 12),
    (16, {"LOCAL_WORLD_SIZE": "4"}, 1, 2, 2),       # torchrun: 4 local ranks share the mask
    (16, {}, 2, 1, 7),                              # Lightning starts 2 ranks on this node
    (16, {"SLURM_CPUS_PER_TASK": "6"}, 4, 1, 5),    # SLURM: each task (rank) has its own CPUs
    (4, {"LOCAL_WORLD_SIZE": "8"}, 1, 2, 1),        # never below one
])
def test_the_rule_splits_the_usable_cores(cores, environ, devices, workers, expected):
    budget = threads.choose(workers=workers, devices=devices, environ=environ, mask=cores, busy=0.0)
    assert budget.threads == expected and budget.source == "rule"
    assert f"{budget.threads} torch thread(s)" in budget.describe()


@pytest.mark.parametrize(("cores", "busy", "expected"), [
    (2, 0.3, 2),     # a little background work takes no core
    (2, 1.0, 1),     # another job keeps one core busy: one thread, not two spinning against it
    (2, 2.0, 1),     # never below one, whatever runs beside
    (16, 4.2, 12),
])
def test_cores_busy_with_other_processes_at_the_start_are_left_to_them(cores, busy, expected):
    budget = threads.choose(mask=cores, environ={}, busy=busy)
    assert budget.threads == expected
    assert ("busy with other processes" in budget.describe()) == (budget.busy > 0)


@pytest.mark.slow
def test_busy_cores_sees_another_process_spinning_and_not_this_one():
    import subprocess
    import sys

    idle = threads.busy_cores(0.5)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.5)
        beside = threads.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert beside - idle > 0.6  # the spinning process: about one core more than before
    import threading

    stop = threading.Event()
    spinning = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])  # this process spins
    spinning.start()
    try:
        own = threads.busy_cores(0.5)
    finally:
        stop.set()
        spinning.join()
    assert own < idle + 0.5  # this process's own work is not another process's


def test_only_media_loaders_workers_take_a_core(tmp_path, prepared_corpus, prepared_images):
    text = compose_train(tmp_path, prepared_corpus, "data.num_workers=1", "trainer.devices=1")
    assert thread_budget(text).workers == 0  # packed token shards: a few percent of one core
    images = compose_train(tmp_path, prepared_corpus, "experiment=tiny_vision", f"data.data_dir={prepared_images}",
                           "data.num_workers=1", "trainer.devices=1")
    assert thread_budget(images).workers == 1


def test_slurm_bounds_the_affinity_mask():
    mask = len(os.sched_getaffinity(0))
    assert threads.usable_cores({}) == mask
    assert threads.usable_cores({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert threads.usable_cores({"SLURM_CPUS_PER_TASK": str(mask + 10)}) == mask


def test_trainer_threads_then_omp_num_threads_override_the_rule():
    assert threads.choose(workers=1, threads=3, environ={"OMP_NUM_THREADS": "2"}, mask=2, busy=0.0).threads == 3
    budget = threads.choose(workers=1, environ={"OMP_NUM_THREADS": "2"}, mask=2)
    assert (budget.threads, budget.source) == (2, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="trainer.threads"):
        threads.choose(threads=0)


def test_train_applies_trainer_threads_and_lightning_never_sees_the_key(tmp_path, prepared_corpus):
    cfg = compose_train(tmp_path, prepared_corpus, "trainer.threads=3", "trainer.devices=1")
    before = torch.get_num_threads()
    try:
        assert threads.apply(thread_budget(cfg)).threads == torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert build(cfg)["trainer"] is not None  # threads is herd's key, not a Trainer argument
    with pytest.raises(ConfigError, match="trainer.threads"):
        thread_budget(compose_train(tmp_path, prepared_corpus, "trainer.threads=-1"))
