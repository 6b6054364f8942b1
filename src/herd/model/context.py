"""Context parallelism (CP): one row's tokens spread over the ranks of a group, as in Llama 3 (paper 3.3.2).

A row of ``seq`` tokens is cut into ``2 x size`` equal chunks; rank ``i`` of the group holds chunks
``i`` and ``2 x size - 1 - i``. Under a causal mask the work of a chunk grows with its place in the
row, so pairing an early chunk with a late one gives every rank the same work (rank 0 holds the
first and the last chunk, rank ``size - 1`` the two middle ones).

Every rank runs the whole model on its own ``seq / size`` tokens. In each attention layer it
all-gathers the keys and values of the whole row from the group (:meth:`ContextParallel.gather`),
puts them back in row order and attends with its local queries; the backward reduce-scatters the
gradients of the keys and values back to the ranks that computed them. The paper chose this
all-gather over ring attention because it serves any mask, document masks included, and grouped
query attention keeps K/V small. So the masks (documents, shared-prompt responses) and the RoPE
positions are computed on the whole row, then each rank keeps the rows of its own queries.

The loss of a rank is its own tokens' sum; divided by the row's (or the window's) total count it
adds up over the group to the exact mean (see :mod:`herd.stages.accumulation`).

A model is used with CP by passing ``context=ContextParallel(group)`` to
:meth:`herd.model.Transformer.forward` (and to the losses of :mod:`herd.model.loss`); without it the
same model computes whole rows, as decoding with a KV cache does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ContextParallel:
    """The ranks of ``group`` share each row along the sequence, in the load-balanced layout above.

    ``size`` and ``rank`` default to the group's; giving them without a group (size 1) makes a
    single-process stand-in whose :meth:`gather` is the identity (for tests of the layout).
    """

    def __init__(self, group: Any = None, *, size: int | None = None, rank: int | None = None) -> None:
        self.group = group
        self.size = size if size is not None else (dist.get_world_size(group) if group is not None else 1)
        self.rank = rank if rank is not None else (dist.get_rank(group) if group is not None else 0)
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"context parallel rank {self.rank} of size {self.size} is not a valid place")
        self._index_cache: dict[tuple[int, str], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ContextParallel(size={self.size}, rank={self.rank})"

    # ----------------------------------------------------------------------------- layout

    def check_length(self, seq: int) -> int:
        """The length of one chunk; a row must cut into ``2 x size`` equal chunks."""
        if seq % (2 * self.size):
            raise ValueError(f"a row of {seq} tokens does not cut into 2 x context_parallel_size = {2 * self.size} "
                             f"equal chunks: use a data.seq_len (and context stage seq_len) that is a multiple of "
                             f"{2 * self.size}")
        return seq // (2 * self.size)

    def chunks_of(self, rank: int) -> tuple[int, int]:
        """The two chunks (of ``2 x size``) that ``rank`` holds, in the order it holds them."""
        return rank, 2 * self.size - 1 - rank

    def local_index(self, seq: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The places in the row (``seq / size`` of them, ascending) of this rank's tokens."""
        key = (seq, str(device))
        if key not in self._index_cache:
            chunk = self.check_length(seq)
            first, second = self.chunks_of(self.rank)
            self._index_cache[key] = torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                                                torch.arange(second * chunk, (second + 1) * chunk)]).to(device)
        return self._index_cache[key]

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of ``tensor`` along ``dim`` (a whole row there): ``seq / size`` places."""
        if self.size == 1:
            return tensor
        return tensor.index_select(dim, self.local_index(tensor.shape[dim], tensor.device))

    def gather(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole row along ``dim``, in row order, from every rank's part (an all-gather); the backward
        sums the gradients of each part over the group and returns each rank its own (a reduce-scatter)."""
        if self.size == 1:
            return local
        return _GatherRow.apply(local, dim, self)


# torch >= 2.13 names them *_single (the *_tensor names still work, with a deprecation warning)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def local(tensor: torch.Tensor, context: ContextParallel | None, dim: int = 1) -> torch.Tensor:
    """This rank's places of ``tensor`` (whole rows along ``dim``) under ``context``; the tensor itself without."""
    return context.shard(tensor, dim) if context is not None else tensor


def _to_row_order(parts: torch.Tensor, size: int) -> torch.Tensor:
    """(size * local, ...) parts in rank order -> (seq, ...) in row order (dim 0)."""
    chunk = parts.shape[0] // (2 * size)
    by_rank = parts.view(size, 2, chunk, *parts.shape[1:])  # rank r: its chunks r and 2*size-1-r
    first, second = by_rank[:, 0], by_rank[:, 1].flip(0)  # chunks 0..size-1, then size..2*size-1
    return torch.cat([first, second]).reshape(2 * size * chunk, *parts.shape[1:])


def _to_rank_order(row: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse of :func:`_to_row_order`: (seq, ...) in row order -> (size * local, ...) in rank order."""
    chunk = row.shape[0] // (2 * size)
    chunks = row.view(2 * size, chunk, *row.shape[1:])
    by_rank = torch.stack([chunks[:size], chunks[size:].flip(0)], dim=1)  # (size, 2, chunk, ...)
    return by_rank.reshape(row.shape)


class _GatherRow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, dim: int, cp: ContextParallel) -> torch.Tensor:
        ctx.dim, ctx.cp = dim, cp
        moved = local.movedim(dim, 0).contiguous()
        parts = moved.new_empty((cp.size * moved.shape[0], *moved.shape[1:]))
        _all_gather(parts, moved, group=cp.group)
        return _to_row_order(parts, cp.size).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad_row: torch.Tensor):
        cp, dim = ctx.cp, ctx.dim
        parts = _to_rank_order(grad_row.movedim(dim, 0).contiguous(), cp.size).contiguous()
        local = parts.new_empty((parts.shape[0] // cp.size, *parts.shape[1:]))
        _reduce_scatter(local, parts, group=cp.group)
        return local.movedim(0, dim), None, None
