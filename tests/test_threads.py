"""herd's thread budget: torch's intra-op threads from the cores a process may use, the ranks sharing them
and the loader workers; trainer.threads (or OMP_NUM_THREADS) overrides; train.py applies it before building."""

from __future__ import annotations

import os

import pytest
import torch

from helpers.training import compose_train
from herd import threads
from herd.train import ConfigError, build, thread_budget


@pytest.mark.parametrize(("cores", "environ", "devices", "workers", "expected"), [
    (2, {}, 1, 1, 1),                               # the 2-core default: one core for the loader worker
    (2, {}, 1, 0, 2),
    (16, {}, 1, 4, 12),
    (16, {"LOCAL_WORLD_SIZE": "4"}, 1, 2, 2),       # torchrun: 4 local ranks share the mask
    (16, {}, 2, 1, 7),                              # Lightning starts 2 ranks on this node
    (16, {"SLURM_CPUS_PER_TASK": "6"}, 4, 1, 5),    # SLURM: each task (rank) has its own CPUs
    (4, {"LOCAL_WORLD_SIZE": "8"}, 1, 2, 1),        # never below one
])
def test_the_rule_splits_the_usable_cores(cores, environ, devices, workers, expected):
    budget = threads.choose(workers=workers, devices=devices, environ=environ, mask=cores)
    assert budget.threads == expected and budget.source == "rule"
    assert f"{budget.threads} torch thread(s)" in budget.describe()


def test_slurm_bounds_the_affinity_mask():
    mask = len(os.sched_getaffinity(0))
    assert threads.usable_cores({}) == mask
    assert threads.usable_cores({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert threads.usable_cores({"SLURM_CPUS_PER_TASK": str(mask + 10)}) == mask


def test_trainer_threads_then_omp_num_threads_override_the_rule():
    assert threads.choose(workers=1, threads=3, environ={"OMP_NUM_THREADS": "2"}, mask=2).threads == 3
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
