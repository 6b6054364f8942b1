"""How many intra-op threads torch may use in a training process: a budget from the cores it may use.

torch's default is one thread per core the machine has, whoever else runs there. Two heavy
processes on the same cores then oversubscribe them, and OpenMP threads that spin while waiting
for each other make both several times slower (measured on 2 cores: 4 minutes alone, over 25
beside one other training run). herd instead counts the cores this process may use and splits them:

    cores   = the CPUs of this process's affinity mask (``os.sched_getaffinity``), at most
              ``SLURM_CPUS_PER_TASK`` when SLURM sets it
    busy    = cores that other processes keep busy when the run starts (:func:`busy_cores`: the
              machine's CPU time over a quarter of a second, less this process's own), rounded
    ranks   = training processes sharing those cores: ``LOCAL_WORLD_SIZE`` (torchrun's local
              ranks); else 1 under SLURM (each task, a rank, gets its own CPUs); else the ranks
              Lightning starts on this node (``trainer.devices``)
    threads = max(1, (cores - busy) // ranks - media loader workers per rank)

A DataLoader worker runs with one thread (torch sets it in every worker). Workers that decode
media (images, audio) keep a core busy, so each gets a core of its own; workers that read packed
token shards cost a few percent of one core and get none (measured: ``make train``, 1 such
worker, 4,176 tokens/s at 2 threads against 2,288 at 1 on 2 idle cores). Counting the busy cores
keeps a run that starts beside another heavy job from spinning its threads against it, while a run
alone uses every core. ``trainer.threads`` sets the number outright; an ``OMP_NUM_THREADS`` in the environment
is taken as such a choice too. The choice is logged.
"""

from __future__ import annotations

import os
import time
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
    busy: int = 0

    def describe(self) -> str:
        """One line for the log."""
        if self.source != "rule":
            return f"{self.threads} torch thread(s), set by {self.source}"
        busy = f", {self.busy} of them busy with other processes at the start" if self.busy else ""
        return (f"{self.threads} torch thread(s): {self.cores} core(s) this process may use{busy}, shared by "
                f"{self.ranks} rank(s), minus {self.workers} media loader worker(s) per rank; trainer.threads "
                "overrides")


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


def busy_cores(window: float = 0.25) -> float:
    """How many cores other processes kept busy over the next ``window`` seconds: the machine's non-idle
    CPU time (``/proc/stat``) less this process's own, per second. 0 where ``/proc/stat`` is missing."""
    try:
        before, own_before, start = _cpu_busy_seconds(), _own_seconds(), time.monotonic()
        time.sleep(window)
        after, own_after, end = _cpu_busy_seconds(), _own_seconds(), time.monotonic()
    except OSError:
        return 0.0
    return max(0.0, ((after - before) - (own_after - own_before)) / max(end - start, 1e-3))


def _cpu_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is inside user


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def choose(workers: int = 0, devices: int = 1, threads: int | None = None,
           environ: Mapping[str, str] | None = None, mask: int | None = None,
           busy: float | None = None) -> ThreadBudget:
    """The thread budget of one training process (see the module docstring); ``threads`` overrides it.

    ``workers``: loader workers per rank that decode media (a core each). ``environ`` and ``mask``
    (the affinity mask's size) default to this process's; ``busy`` (cores busy with other
    processes) is measured by :func:`busy_cores` when the rule applies and it is not given."""
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
    taken = max(0, min(cores - 1, round(busy_cores() if busy is None else busy)))
    return ThreadBudget(max(1, (cores - taken) // ranks - workers), cores, ranks, workers, "rule", taken)


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
