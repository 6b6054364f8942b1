"""Batch sizes that fit in memory, and progress lines for long evaluations.

The rule for batch sizes (:func:`rows_per_batch`) is deliberately simple: an evaluation forward
pass (no gradients) holds, per token, about

    bytes_per_token = 4 * (2 * vocab_size + 3 * ffn_hidden_dim + 8 * dim)

- float32 logits and their log-softmax (2 x vocab), the SwiGLU's three hidden vectors
(3 x ffn_hidden_dim) and a few residual-stream copies (8 x dim). A batch gets ``fraction`` (a
quarter by default) of the memory that is free now on the device (``torch.cuda.mem_get_info``
on a GPU, the kernel's available pages on a CPU), so

    rows = fraction * free_bytes // (seq_len * bytes_per_token), between 1 and max_rows.

The weights are already loaded when the rule is applied, so they are not counted again. Set a
task's ``batch_size`` to override it.
"""

from __future__ import annotations

import os
import time

import torch

from herd import logs
from herd.model import ModelConfig

logger = logs.get_logger(__name__)

# Assumed free memory when the platform does not say (a CPU without sysconf's available pages).
FALLBACK_FREE_BYTES = 4 * 1024**3


def free_memory_bytes(device: torch.device | str) -> int:
    """Bytes free now on ``device``: CUDA's own count on a GPU, available physical pages on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_FREE_BYTES


def bytes_per_token(config: ModelConfig) -> int:
    """The activation bytes one token of an evaluation forward pass holds (see the module docstring)."""
    return 4 * (2 * config.vocab_size + 3 * config.ffn_hidden_dim + 8 * config.dim)


def rows_per_batch(
    config: ModelConfig,
    seq_len: int,
    device: torch.device | str = "cpu",
    *,
    fraction: float = 0.25,
    max_rows: int = 64,
    free_bytes: int | None = None,
) -> int:
    """Rows of ``seq_len`` tokens per evaluation batch under the rule of the module docstring."""
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    rows = int(fraction * free) // max(1, seq_len * bytes_per_token(config))
    return max(1, min(max_rows, rows))


class Progress:
    """Plain progress lines for a long evaluation, at most one every ``every_seconds``::

        mcq: 1,200/3,600 sequences (33%) | elapsed 0:12 | ETA 0:24

    The lines go through the ``herd`` logger (console and the run's log file). ``update`` counts
    work done; ``close`` prints the final line.
    """

    def __init__(self, task: str, total: int, unit: str, every_seconds: float = 10.0) -> None:
        self.task, self.total, self.unit, self.every_seconds = task, max(0, int(total)), unit, every_seconds
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, amount: int = 1) -> None:
        """Count ``amount`` more units; print a line if ``every_seconds`` have passed since the last."""
        self.done += amount
        now = time.perf_counter()
        if now - self.last >= self.every_seconds:
            self.last = now
            logs.info(logger, self.line(now))

    def close(self) -> None:
        """Print the final line (how long it took)."""
        logs.info(logger, self.line(time.perf_counter(), final=True))

    def line(self, now: float, final: bool = False) -> str:
        """The progress line at time ``now`` (``time.perf_counter``)."""
        elapsed = now - self.start
        share = self.done / self.total if self.total else 1.0
        text = f"{self.task}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}) | elapsed {_clock(elapsed)}"
        if not final and 0 < share < 1:
            text += f" | ETA {_clock(elapsed / share - elapsed)}"
        return text


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
