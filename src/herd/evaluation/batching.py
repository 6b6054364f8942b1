"""Batch sizes that fit in memory for evaluation forward passes.

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

import torch

from herd.model import ModelConfig

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
