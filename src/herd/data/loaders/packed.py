"""PackedDataModule: streams prepared shards into training as a weighted, resumable mixture.

Batches are dicts of int64 tensors of shape (batch_size, seq_len):

- ``tokens``: input token ids;
- ``document_ids``: per row, 0 for the first document and +1 at each document boundary, so
  ``document_ids[:, i] == document_ids[:, j]`` is the document mask;
- ``targets``: the next token, or -100 where it belongs to another document or is padding.
  Rows of dialog sources carry a loss mask, and their targets are also -100 wherever the next
  token is not one the assistant wrote (its content and closing ``<|eot_id|>``/``<|eom_id|>``),
  so the same next-token loss trains text (every token) and dialogs (assistant tokens only).
  One DataModule may mix text and dialog sources.

Preference sources (``herd.data.kinds.preference``) lay out each ranking as ``[prompt][response 1]
[response 2]...`` in one row; their batches hold the three keys above and two more:

- ``targets`` is the next token only where that token is the content of a response (not its
  header, nor its closing ``<|eot_id|>``), else -100;
- ``response_ids``: 0 on prompt tokens and padding, k = 1, 2, ... on the tokens of the k-th
  response of the ranking in the row (its header and ``<|eot_id|>`` included);
- ``ranks``: the rank of the response a token belongs to (0 = best; equal ranks are ties), -1 on
  prompt tokens and padding.

``document_ids`` tells the rankings of a row apart, ``response_ids`` the responses of one
ranking. A DataModule of preference sources cannot also read text or dialog sources (their
batches have other keys): it refuses such a mix.

Dialog and preference sources pack whole examples into rows, so they are read at the seq_len
they were prepared with: another ``seq_len`` (at construction or with
:meth:`PackedDataModule.set_seq_len`) is refused, naming the source and the stored length. Text
sources are re-cut to any length.

The train stream is infinite (sources repeat pass after pass): bound training with
``trainer.max_steps`` and validate every N steps. The val stream reads every source's val split
once; each rank yields the same number of val batches (computed from the manifest), so
distributed validation never waits on a rank that ran out.

Where the data is: ``data_dir`` (a folder or URL holding ``manifest.json``, as written by
``herd.prepare``), optionally per source; relative paths are resolved against the repository
root. A source may list its shards explicitly (``train``/``val``: a brace pattern such as
``s3://bucket/web/train-{000000..000099}.tar``, or a list); each must be listed in the manifest,
which is where herd learns its row count and checksum.

Damaged shards: with ``on_corrupt_shard="skip"`` a shard that fails its checks is skipped with a
counted warning; :attr:`PackedDataModule.skipped_shards` totals the skips of every reader of this
rank (train and val loaders, every DataLoader worker) on the main process.

Resuming: see ``herd.data.loaders.stream``. The state (:meth:`state_dict`) is the list of plan segments
and the batches consumed in each; Lightning saves it in checkpoints. Batches are counted when
Lightning hands them to the training step (``on_before_batch_transfer``), or when yielded if no
trainer is attached.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

from herd.data.loaders.ranks import data_parallel_rank
from herd.data.loaders.stream import (
    ON_CORRUPT,
    READER_KEY,
    SKIPPED_SHARDS_KEY,
    PackedStream,
    Plan,
    Segment,
    SourceShards,
    val_batches_per_rank,
)
from herd.data.manifest import Manifest, ManifestError, Manifests
from herd.data.shards import ShardInfo
from herd.paths import resolve_location

logger = logging.getLogger(__name__)
_STATE_VERSION = 1
_BATCH_KEYS = ("tokens", "document_ids", "targets")  # every batch's; a source's extras add more
_WHOLE_EXAMPLES = {"dialog": "dialogs", "preference": "rankings"}  # what whole-packed sources hold


class PackedDataModule(L.LightningDataModule):
    """Weighted mixture of packed sources; see the module docstring.

    Args:
        data_dir: prepared folder (or URL) with manifest.json; the default for every source.
        sources: ``{name: {weight, data_dir, source, train, val}}``, every key optional:
            ``weight`` (default: the source's share of train tokens), ``data_dir`` (default: the
            top-level one), ``source`` (its name in the manifest, default: the key),
            ``train``/``val`` (explicit shard lists). ``None``: every source of ``data_dir``.
        seq_len, batch_size: per-device batch shape; change later with set_seq_len/set_batch_size.
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        shuffle_buffer: samples per source and reader held for shuffling (1: no shuffling).
        seed: seeds shard order, shuffling and the mixture; same seed, same stream.
        expected_vocab_size, expected_tokenizer_fingerprint: refuse shards made with another
            tokenizer (the model's vocab size / the tokenizer's fingerprint).
        on_corrupt_shard: ``"error"`` (default) or ``"skip"`` (log a counted warning and go on).
        tokenizer: the tokenizer folder of this data (default: the one saved with the first source).
        val_batch_size: batch size of the val loader (default: batch_size).
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        sources: Mapping[str, Mapping[str, Any] | None] | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 1234,
        expected_vocab_size: int | None = None,
        expected_tokenizer_fingerprint: str | None = None,
        on_corrupt_shard: str = "error",
        tokenizer: str | None = None,
        val_batch_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if on_corrupt_shard not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt_shard must be one of {ON_CORRUPT}, got {on_corrupt_shard!r}")
        self.seq_len = _positive("seq_len", seq_len)
        self.batch_size = _positive("batch_size", batch_size)
        self.val_batch_size = _positive("val_batch_size", val_batch_size or batch_size)
        self.num_workers = _non_negative("num_workers", num_workers)
        self.shuffle_buffer = _positive("shuffle_buffer", shuffle_buffer)
        self.seed = int(seed)
        self.on_corrupt_shard = on_corrupt_shard
        self.pin_memory = pin_memory
        self.manifests = Manifests()
        self.names, self.weights, self._train, self._val = self._load_sources(data_dir, sources)
        self._check_batch_keys()
        self._check_tokenizer(expected_vocab_size, expected_tokenizer_fingerprint)
        self._check_seq_len(self.seq_len)
        self.tokenizer = resolve_location(tokenizer) if tokenizer else self.manifest.tokenizer_location
        self._segments: list[Segment] = []
        self._skipped_shards = 0

    # --- configuration ------------------------------------------------------------------------

    def set_seq_len(self, seq_len: int) -> None:
        """Sequence length of the next dataloaders (text rows are re-cut; nothing to re-prepare).

        Refused (ValueError) when a dialog or preference source was prepared with another seq_len.
        """
        self._check_seq_len(_positive("seq_len", seq_len))
        self.seq_len = seq_len

    def set_batch_size(self, batch_size: int) -> None:
        """Batch size of the next train dataloader."""
        self.batch_size = _positive("batch_size", batch_size)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Mixture weights of the next train dataloader, by source name; unnamed sources keep theirs."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"mixture weights name unknown source(s) {unknown}; the sources are {self.names}")
        updated = [float(weights.get(name, old)) for name, old in zip(self.names, self.weights, strict=True)]
        if any(w < 0 for w in updated) or sum(updated) <= 0:
            raise ValueError(f"mixture weights {dict(zip(self.names, updated, strict=True))} must be >= 0 "
                             "and not all 0")
        self.weights = updated

    @property
    def skipped_shards(self) -> int:
        """Damaged shards skipped so far on this rank (``on_corrupt_shard="skip"``; else always 0).

        Totals the train and val loaders and all their DataLoader workers, as batches reach this
        process (a skip shows up with the next batch its worker delivers). It counts skips, not
        distinct shards: a damaged shard is skipped, and counted, on every pass over its source,
        and again when a resumed run re-reads its source to find its place. Starts at 0 in each
        process (it is not part of :meth:`state_dict`).
        """
        return self._skipped_shards

    @property
    def manifest(self) -> Manifest:
        """The manifest of the first source (all sources share one tokenizer)."""
        return next(iter(self.manifests.values()))

    # --- dataloaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """The train mixture for this rank, continuing after the batches consumed so far."""
        rank, world_size = self._data_parallel_rank()
        self._check_enough_shards(world_size)
        self._enter_segment(self._plan(world_size, self.batch_size))
        dataset = PackedStream(self._train, list(self._segments), rank, "train", self.on_corrupt_shard)
        return _StreamLoader(self, dataset, self.num_workers, self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        """Every source's val split once, the same number of batches on every rank."""
        rank, world_size = self._data_parallel_rank()
        if not any(source.shards for source in self._val):
            logger.warning(
                "no val shards in %s: validation is skipped", [m.location for m in self.manifests.values()]
            )
            return []
        plan = self._plan(world_size, self.val_batch_size)
        limit = min(val_batches_per_rank(self._val, plan))
        if limit == 0:
            logger.warning(
                "the val split is too small for %d ranks x %d workers: no val batches",
                world_size,
                plan.num_workers,
            )
        dataset = PackedStream(self._val, [Segment(plan)], rank, "val", self.on_corrupt_shard, limit=limit)
        return _StreamLoader(self, dataset, self.num_workers, self.pin_memory)

    def pass_dataloader(self, split: str = "train", batch_size: int | None = None) -> tuple[DataLoader, int]:
        """Every row of ``split`` once, unshuffled: this rank's share, and the most batches any rank gets.

        For passes that must see every row (DPO's precomputed reference log-probs), unlike
        :meth:`val_dataloader`, which trims every rank to the fewest batches. A rank whose loader
        ends before the returned count must still join the collectives of the remaining steps.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        sources = self._train if split == "train" else self._val
        rank, world_size = self._data_parallel_rank()
        plan = self._plan(world_size, batch_size or self.val_batch_size)
        dataset = PackedStream(sources, [Segment(plan)], rank, "val", self.on_corrupt_shard)
        loader = _StreamLoader(self, dataset, self.num_workers, self.pin_memory)
        return loader, max(val_batches_per_rank(sources, plan), default=0)

    def test_dataloader(self) -> DataLoader | list:
        """The val split again (herd prepares no separate test split)."""
        return self.val_dataloader()

    # --- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Stream position: the plan segments and the batches consumed in each (per rank)."""
        return {
            "version": _STATE_VERSION,
            "segments": [{"plan": s.plan.to_dict(), "batches": s.batches} for s in self._segments],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next train loader continues from it."""
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"data state version {state_dict.get('version')!r} is not {_STATE_VERSION}")
        self._segments = [
            Segment(Plan.from_dict(s["plan"]), int(s["batches"])) for s in state_dict["segments"]
        ]

    @property
    def consumed_batches(self) -> int:
        """Train batches consumed on this rank in the current segment."""
        return self._segments[-1].batches if self._segments else 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the train batches Lightning actually uses (prefetched ones are not counted)."""
        if self.trainer is not None and self.trainer.training:
            self._count_batch()
        return batch

    def _count_batch(self) -> None:
        self._segments[-1] = Segment(self._segments[-1].plan, self._segments[-1].batches + 1)

    def _count_skipped_shards(self, batch: dict[str, Any], last_seen: dict[int, int]) -> None:
        """Take the reader tags off ``batch``; add the reader's new skips to the total.

        ``last_seen`` maps each reader of one loader iteration to the count it last reported
        (a reader's count only grows, so the difference is its new skips).
        """
        reader, skipped = int(batch.pop(READER_KEY)), int(batch.pop(SKIPPED_SHARDS_KEY))
        self._skipped_shards += max(0, skipped - last_seen.get(reader, 0))
        last_seen[reader] = max(skipped, last_seen.get(reader, 0))

    # --- internals ----------------------------------------------------------------------------

    def _plan(self, world_size: int, batch_size: int) -> Plan:
        return Plan(
            seq_len=self.seq_len,
            batch_size=batch_size,
            weights=tuple(self.weights),
            sources=tuple(self.names),
            world_size=world_size,
            num_workers=max(1, self.num_workers),
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
        )

    def _check_enough_shards(self, world_size: int) -> None:
        """Every reader (rank x worker) needs at least one shard of every source it mixes in."""
        readers = world_size * max(1, self.num_workers)
        for source, weight in zip(self._train, self.weights, strict=True):
            if weight > 0 and len(source.shards) < readers:
                raise ManifestError(
                    f"source {source.name!r} has {len(source.shards)} train shards, fewer than the "
                    f"{world_size} ranks x {max(1, self.num_workers)} workers that each need one. Re-run "
                    "herd.prepare with a larger shards.min_count, or lower data.num_workers."
                )

    def _enter_segment(self, plan: Plan) -> None:
        """Continue the current segment if ``plan`` is unchanged, else start a new one."""
        if not self._segments:
            self._segments.append(Segment(plan))
            return
        last = self._segments[-1].plan
        plan = replace(plan, epoch=last.epoch)
        if plan == last:
            return
        if not plan.same_layout(last):
            logger.warning(
                "data stream restarts with a new shard order: ranks/workers/sources/seed changed "
                "(%s -> %s), so read positions cannot carry over", _layout(last), _layout(plan)
            )  # fmt: skip
            plan = replace(plan, epoch=last.epoch + 1)
        self._segments.append(Segment(plan))

    def _data_parallel_rank(self) -> tuple[int, int]:
        return data_parallel_rank(self.trainer)

    def _check_seq_len(self, seq_len: int) -> None:
        """Sources of whole examples (dialogs, rankings) must be read at the length they were packed for."""
        for name, (row_len, kind) in self._whole_rows.items():
            if seq_len + 1 != row_len:
                examples = _WHOLE_EXAMPLES.get(kind, "examples")
                raise ValueError(
                    f"data.seq_len={seq_len}, but source {name!r} holds {examples} packed whole into rows of "
                    f"seq_len={row_len - 1}, which cannot be re-cut without splitting {examples}: set "
                    f"data.seq_len={row_len - 1}, or re-run herd.prepare with seq_len={seq_len}"
                )

    def _check_batch_keys(self) -> None:
        """Refuse sources whose batches would have different keys (preference vs text or dialog)."""
        keys = {source.name: source.extras for source in self._train}
        first = self._train[0]
        for source in self._train[1:]:
            if source.extras != first.extras:
                described = ", ".join(
                    f"{name!r} ({', '.join(_BATCH_KEYS + extras)})" for name, extras in keys.items()
                )
                raise ValueError(
                    f"data.sources: the sources' batches would have different keys: {described}. One "
                    "DataModule reads either preference sources only, or text and dialog sources; "
                    "train on them in separate stages"
                )

    def _load_sources(self, data_dir, sources):
        """Names, weights and train/val shard lists of the configured sources."""
        if sources is None:
            if data_dir is None:
                raise ValueError("data: set data_dir (a prepared folder) or sources")
            sources = dict.fromkeys(self.manifests.load(data_dir).source_names())
        if not sources:
            raise ValueError("data.sources is empty; name at least one source")
        names, weights, train, val = [], [], [], []
        self._whole_rows: dict[str, tuple[int, str]] = {}  # (row_len, kind) of sources of whole examples
        for name, spec in sources.items():
            spec = dict(spec or {})
            manifest, in_manifest = self.manifests.source(name, spec, data_dir)
            if manifest.whole_examples(in_manifest):
                self._whole_rows[name] = (manifest.row_len, manifest.source_kind(in_manifest))
            names.append(name)
            weights.append(_weight(name, spec, manifest, in_manifest))
            train.append(_source_shards(name, manifest, in_manifest, "train", spec.get("train")))
            val.append(_source_shards(name, manifest, in_manifest, "val", spec.get("val")))
        if sum(weights) <= 0:
            raise ValueError(f"data.sources: the weights {dict(zip(names, weights, strict=True))} sum to 0")
        return names, weights, train, val


    def _check_tokenizer(self, vocab_size: int | None, fingerprint: str | None) -> None:
        manifests = list(self.manifests.values())
        for manifest in manifests:
            manifest.check_tokenizer(vocab_size, fingerprint)
        for other in manifests[1:]:
            if other.fingerprint != manifests[0].fingerprint:
                raise ManifestError(
                    f"sources use different tokenizers: {manifests[0].location} has fingerprint "
                    f"{manifests[0].fingerprint} but {other.location} has {other.fingerprint}; "
                    "prepare every source with the same tokenizer"
                )


class _StreamLoader(DataLoader):
    """A DataLoader over a PackedStream that resumes where the DataModule says, and counts batches.

    Each ``iter()`` (a new epoch included) starts after the batches consumed so far, so
    re-iterating never repeats data. Without a trainer, yielded batches count as consumed. The
    stream's reader tags (``reader``, ``skipped_shards``) are taken off every batch and added to
    :attr:`PackedDataModule.skipped_shards`, so batches hold only tokens, document_ids, targets
    (and, from preference sources, response_ids and ranks).
    """

    def __init__(
        self, datamodule: PackedDataModule, dataset: PackedStream, num_workers: int, pin_memory: bool
    ):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        self._datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset: PackedStream = self.dataset
        train = dataset.split == "train"
        if train:
            dataset.set_start_batch(self._datamodule.consumed_batches)
        iterator = super().__iter__()
        last_seen: dict[int, int] = {}
        for index, batch in enumerate(iterator):
            self._datamodule._count_skipped_shards(batch, last_seen)
            if dataset.limit is not None and index >= dataset.limit:
                return
            if train and self._datamodule.trainer is None:
                self._datamodule._count_batch()
            yield batch


def _source_shards(name: str, manifest: Manifest, in_manifest: str, split: str, explicit) -> SourceShards:
    listed = manifest.shards(in_manifest, split)
    shards = listed if explicit is None else _explicit_shards(name, split, explicit, listed, manifest)
    loss_mask, extras = manifest.has_loss_mask(in_manifest), manifest.extras(in_manifest)
    return SourceShards(name, tuple(shards), manifest.row_len, manifest.vocab_size, loss_mask, extras)


def _explicit_shards(name, split, explicit, listed: list[ShardInfo], manifest: Manifest) -> list[ShardInfo]:
    """Shards at user-given locations, each matched by file name to a manifest entry."""
    urls = expand_urls(explicit) if isinstance(explicit, str) else [str(u) for u in explicit]
    by_name = {PurePosixPath(s.url).name: s for s in listed}
    shards = []
    for url in urls:
        entry = by_name.get(PurePosixPath(url).name)
        if entry is None:
            raise ManifestError(
                f"data.sources.{name}.{split}: shard {url} is not listed in {manifest.location} "
                f"(its {split} shards are {sorted(by_name)[:3]}...); list only shards of that manifest"
            )
        shards.append(ShardInfo(resolve_location(url), entry.rows, entry.first_row, entry.sha256))
    return shards


def _weight(name: str, spec: Mapping[str, Any], manifest: Manifest, in_manifest: str) -> float:
    if spec.get("weight") is None:
        return float(manifest.data["sources"][in_manifest]["splits"]["train"]["tokens"])
    weight = float(spec["weight"])
    if weight < 0:
        raise ValueError(f"data.sources.{name}.weight must be >= 0, got {weight}")
    return weight


def _layout(plan: Plan) -> str:
    return f"{plan.world_size} ranks x {plan.num_workers} workers, sources {list(plan.sources)}, seed {plan.seed}"


def _positive(key: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"data.{key} must be a positive integer, got {value!r}")
    return value


def _non_negative(key: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"data.{key} must be an integer >= 0, got {value!r}")
    return value
