"""Applied to the plain backbone from outside: activation checkpointing (and, with strategies, sharding)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from herd.model import Transformer


def checkpoint_every(setting: str | int | None) -> int:
    """Blocks per checkpointed block: 0 for ``none``, 1 for ``full``, k for every k-th block."""
    if setting in (None, "none", 0, False):
        return 0
    if setting in ("full", True):
        return 1
    if isinstance(setting, int) and setting > 0:
        return setting
    raise ValueError(
        f"stage.activation_checkpointing={setting!r}: use none, full (every block) or a positive integer k "
        "(every k-th block)"
    )


def apply_activation_checkpointing(model: Transformer, setting: str | int | None) -> int:
    """Recompute the activations of every k-th block in the backward pass; returns how many were wrapped.

    Parameter and state-dict names are unchanged (the wrapper strips its prefix), so checkpoints
    and exports are the same with or without it.
    """
    every = checkpoint_every(setting)
    if not every:
        return 0
    wrapped = 0
    for index, block in enumerate(model.layers):
        if index % every == 0 and not _is_wrapped(block):
            model.layers[index] = checkpoint_wrapper(block)
            wrapped += 1
    return wrapped


def _is_wrapped(block: nn.Module) -> bool:
    return hasattr(block, "_checkpoint_wrapped_module")
