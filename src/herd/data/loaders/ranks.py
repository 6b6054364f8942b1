"""Which share of the data a process reads: its data-parallel rank, the same for every loader.

Tensor- (and context-) parallel ranks of one model replica compute on the same rows, so they
must read the same data: a loader splits its data by the data-parallel rank and world size, not
by the global ones. The trainer's strategy knows them (Lightning's ``ModelParallelStrategy``
derives them from its device mesh; DDP and one device give the global rank).
"""

from __future__ import annotations

import os

import lightning as L
import torch


def data_parallel_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """(rank, world size) of data parallelism: from the trainer's strategy, torch.distributed or env.

    Tensor-parallel ranks of one group share a data-parallel rank (the strategy says so).
    """
    if trainer is not None:
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def data_parallel_size(trainer: L.Trainer | None, context_parallel: int | None = None) -> int:
    """How many model replicas read different rows (:func:`data_parallel_rank`'s world size).

    With ``context_parallel``: how many there would be if that many ranks shared each row (a context
    stage that changes it; the strategy's ranks that stop sharing rows read rows of their own).
    """
    _, replicas = data_parallel_rank(trainer)
    if context_parallel is None or trainer is None:
        return replicas
    active = getattr(trainer.strategy, "active_context_parallel_size", 1)
    return replicas * active // context_parallel
