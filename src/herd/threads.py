"""How many intra-op threads torch may use in a training process: a budget from the cores it may use.

torch's default is one thread per core the machine has, whoever else runs there. Two heavy
processes on the same cores then oversubscribe them, and OpenMP threads that spin while waiting
for each other make both several times slower (measured on 2 cores: 4 minutes alone, over 25
beside one other training run). herd instead counts the cores this process may use and splits them:

    cores   = the CPUs of this process's affinity mask (``os.sched_getaffinity``), at most
              ``SLURM_CPUS_PER_TASK`` when SLURM sets it
    ranks   = training processes sharing those cores: ``LOCAL_WORLD_SIZE`` (torchrun's local
              ranks); else 1 under SLURM (each task, a rank, gets its own CPUs); else the ranks
              Lightning starts on this node (``trainer.devices``)
    threads = max(1, cores // ranks - loader workers per rank)

A DataLoader worker runs with one thread (torch sets it in every worker), so each gets a core of
its own. ``trainer.threads`` sets the number outright; an ``OMP_NUM_THREADS`` in the environment
is taken as such a choice too. The choice is logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from herd import logs

logger = logs.get_logger(__name__)


@dataclass(frozen=True)
class ThreadBudget:
    """The chosen number of torch threads and what it was derived from."""

    threads: int
    cores: int
    ranks: int
    workers: int
    source: str  # "rule", "trainer.threads" or "OMP_NUM_THREADS"

    def describe(self) -> str:
        """One line for the log."""
        if self.source != "rule":
            return f"{self.threads} torch thread(s), set by {self.source}"
        return (f"{self.threads} torch thread(s): {self.cores} core(s) this process may use, shared by "
                f"{self.ranks} rank(s), minus {self.workers} loader worker(s) per rank; trainer.threads overrides")


def usable_cores(environ: Mapping[str, str] | None = None, mask: int | None = None) -> int:
    """CPUs in this process's affinity mask (or ``mask`` of them), at most ``SLURM_CPUS_PER_TASK``."""
    environ = os.environ if environ is None else environ
    cores = mask or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    slurm = _positive_int(environ.get("SLURM_CPUS_PER_TASK"))
    return min(cores, slurm) if slurm else cores


def ranks_sharing_cores(devices: int, environ: Mapping[str, str] | None = None) -> int:
    """Training processes that share this process's cores (see the module docstring)."""
    environ = os.environ if environ is None else environ
    local = _positive_int(environ.get("LOCAL_WORLD_SIZE"))
    if local:
        return local
    if _positive_int(environ.get("SLURM_CPUS_PER_TASK")):
        return 1
    return max(1, devices)


def choose(workers: int = 0, devices: int = 1, threads: int | None = None,
           environ: Mapping[str, str] | None = None, mask: int | None = None) -> ThreadBudget:
    """The thread budget of one training process (see the module docstring); ``threads`` overrides it.
    ``environ`` and ``mask`` (the affinity mask's size) default to this process's."""
    environ = os.environ if environ is None else environ
    cores = usable_cores(environ, mask)
    ranks = ranks_sharing_cores(devices, environ)
    workers = max(0, int(workers))
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"trainer.threads={threads!r}: give a positive number of torch threads, or null "
                             "for herd's choice from the cores this process may use")
        return ThreadBudget(threads, cores, ranks, workers, "trainer.threads")
    omp = _positive_int(environ.get("OMP_NUM_THREADS"))
    if omp:
        return ThreadBudget(omp, cores, ranks, workers, "OMP_NUM_THREADS")
    return ThreadBudget(max(1, cores // ranks - workers), cores, ranks, workers, "rule")


def apply(budget: ThreadBudget) -> ThreadBudget:
    """Set torch's intra-op threads to the budget and log it."""
    torch.set_num_threads(budget.threads)
    logs.info(logger, f"threads: {budget.describe()}")
    return budget


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None
