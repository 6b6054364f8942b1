"""Held-out perplexity: token-weighted next-token loss on the val split of prepared data, per source.

For each source of a prepared folder (``herd.prepare``'s manifest), every row of its val split is
read once, in order, and scored with the pretraining stage's own evaluation function
(:func:`herd.model.loss.next_token_scores`: summed cross-entropy, number of predicted
tokens, greedy hits). A source's loss is

    loss = sum of -log p(token | prefix) over its predicted tokens / number of predicted tokens

in nats, and its perplexity is ``exp(loss)``. Positions whose next token belongs to another
document, or is padding, are not predicted (the same targets training uses). ``all`` pools every
source's tokens, so it weighs sources by their val tokens, not equally.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from herd.data.loaders.packed import PackedDataModule
from herd.data.manifest import Manifest
from herd.logs import Progress
from herd.model.loss import next_token_scores
from herd.paths import resolve_location

ALL_SOURCES = "all"


@dataclass(frozen=True)
class Perplexity:
    """Summed loss (nats), predicted tokens and greedy hits of one source's val split."""

    source: str
    total_loss: float
    tokens: int
    correct: int

    @property
    def loss(self) -> float:
        """Mean next-token loss per predicted token (nats); NaN without tokens."""
        return self.total_loss / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """``exp(loss)``."""
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def accuracy(self) -> float:
        """Share of predicted tokens the model ranks first."""
        return self.correct / self.tokens if self.tokens else math.nan


def score_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    source: str,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> Perplexity:
    """Pool :func:`next_token_scores` over ``batches`` (dicts of tokens, document_ids, targets)."""
    device = next(model.parameters()).device
    total, tokens, correct = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k in ("tokens", "document_ids", "targets")}
        loss_sum, n_tokens, hits = next_token_scores(model, batch, chunk_size)
        total += float(loss_sum)
        tokens += int(n_tokens)
        correct += int(hits)
        if progress is not None:
            progress.update(int(batch["tokens"].shape[0]))
    return Perplexity(source, total, tokens, correct)


def val_rows(manifest: Manifest, source: str, seq_len: int) -> int:
    """Rows of ``seq_len`` tokens that the val split of ``source`` yields (stored rows are re-cut)."""
    stored = sum(shard.rows for shard in manifest.shards(source, "val"))
    return stored * manifest.row_len // (seq_len + 1)


def source_perplexities(
    model: torch.nn.Module,
    data_dir: str,
    *,
    sources: Sequence[str] | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    chunk_size: int | None = None,
) -> dict[str, Perplexity]:
    """Perplexity of each source's val split in ``data_dir``, and of all of them pooled (``"all"``).

    ``sources`` defaults to every source of the manifest; ``seq_len`` to the prepared row length,
    capped at the model's ``max_seq_len``. Rows are read once, in order, without shuffling.
    """
    manifest = Manifest.load(resolve_location(str(data_dir)))
    names = list(sources) if sources else manifest.source_names()
    unknown = sorted(set(names) - set(manifest.source_names()))
    if unknown:
        raise ValueError(f"perplexity.sources: {unknown} are not sources of {manifest.location}; it has "
                         f"{manifest.source_names()}")
    config = model.config
    seq_len = int(seq_len or min(manifest.row_len - 1, config.max_seq_len))
    total_rows = sum(val_rows(manifest, name, seq_len) for name in names)
    progress = Progress("perplexity", total_rows, "rows")
    out = {}
    for name in names:
        data = PackedDataModule(str(data_dir), sources={name: None}, seq_len=seq_len, batch_size=batch_size,
                                num_workers=0, shuffle_buffer=1, expected_vocab_size=config.vocab_size)
        out[name] = score_batches(model, data.val_dataloader(), name, chunk_size, progress)
    progress.close()
    out[ALL_SOURCES] = Perplexity(ALL_SOURCES, sum(p.total_loss for p in out.values()),
                                  sum(p.tokens for p in out.values()), sum(p.correct for p in out.values()))
    return out
