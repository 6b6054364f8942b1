"""Synthetic token batches: for throughput benchmarks and scale-out checks, no files needed.

Every row repeats a random motif drawn from a Zipf distribution over the vocabulary, so a model
learns quickly (first the token frequencies, then to copy the motif) and any mistake in
data-parallel splitting shows. The global batch of step k depends only on (seed, k): rank r of
R data-parallel ranks gets rows [r * batch_size, (r + 1) * batch_size) of it, so any number of
ranks sees exactly the batches one process with ``batch_size * R`` rows would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from herd.data.loaders.ranks import data_parallel_rank


class SyntheticBatches(IterableDataset):
    """Yields this rank's slice of each global batch, starting at ``start_step``."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0, motif_len: tuple[int, int] = (8, 64), num_steps: int | None = None) -> None:
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_step, self.motif_len, self.num_steps = start_step, motif_len, num_steps
        self.frequencies = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)  # Zipf

    def global_batch(self, step: int) -> torch.Tensor:
        """Rows (batch_size * world_size, seq_len + 1) of step ``step``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = []
        for _ in range(self.batch_size * self.world_size):
            length = int(torch.randint(self.motif_len[0], self.motif_len[1] + 1, (1,), generator=generator))
            motif = torch.multinomial(self.frequencies, length, replacement=True, generator=generator)
            rows.append(motif.repeat(self.seq_len // length + 2)[: self.seq_len + 1])
        return torch.stack(rows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            rows = self.global_batch(step)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield {"tokens": rows[:, :-1], "targets": rows[:, 1:],
                   "document_ids": torch.zeros(self.batch_size, self.seq_len, dtype=torch.long)}
            step += 1


class SyntheticDataModule(L.LightningDataModule):
    """Batches of repeated random motifs, split exactly across data-parallel ranks; resumable."""

    def __init__(self, vocab_size: int, seq_len: int = 256, batch_size: int = 8, seed: int = 1234,
                 val_batches: int = 4) -> None:
        super().__init__()
        if vocab_size <= 0 or seq_len <= 0 or batch_size <= 0:
            raise ValueError("data.vocab_size, data.seq_len and data.batch_size must be positive")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.val_batches = seed, val_batches
        self.tokenizer = None
        self.consumed = 0

    def set_seq_len(self, seq_len: int) -> None:
        """Sequence length of the next dataloaders."""
        self.seq_len = seq_len

    def set_batch_size(self, batch_size: int) -> None:
        """Rows per rank of the next train dataloader."""
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        rank, world = data_parallel_rank(self.trainer)
        dataset = SyntheticBatches(self.vocab_size, self.seq_len, self.batch_size, rank, world, self.seed,
                                   start_step=self.consumed)
        return DataLoader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        rank, world = data_parallel_rank(self.trainer)
        dataset = SyntheticBatches(self.vocab_size, self.seq_len, self.batch_size, rank, world, self.seed + 1,
                                   num_steps=self.val_batches)
        return DataLoader(dataset, batch_size=None)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed = int(state_dict["consumed"])
