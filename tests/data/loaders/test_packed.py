"""PackedDataModule: batch format, determinism, mixture, re-chunking, resume, validation, bad shards."""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from helpers.synthetic import SOURCE_OFFSET, source_of, write_dataset
from herd.data.loaders.packed import PackedDataModule
from herd.data.loaders.stream import batches_before, val_batches_per_rank
from herd.data.manifest import ManifestError
from herd.data.packing import IGNORE_INDEX
from herd.data.shards import ShardError
from herd.paths import repo_root

ROW_LEN = 17


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Sources a and b: ~180 train rows each in shards of 8 rows, 18 val rows in shards of 8."""
    return write_dataset(
        tmp_path_factory.mktemp("prepared"), {"a": (3000, 300), "b": (3000, 300)}, ROW_LEN, 8
    )


def _module(dataset, **kwargs) -> PackedDataModule:
    options = {"seq_len": 16, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 10, "seed": 7}
    return PackedDataModule(
        str(dataset), {"a": {"weight": 0.5}, "b": {"weight": 0.5}}, **{**options, **kwargs}
    )


def _take(iterator, n):
    return list(islice(iterator, n))


def _assert_same(batches, others):
    assert len(batches) == len(others)
    for batch, other in zip(batches, others, strict=True):
        for key in ("tokens", "document_ids", "targets"):
            torch.testing.assert_close(batch[key], other[key], rtol=0, atol=0)


def test_batch_format_and_targets(dataset):
    (batch,) = _take(iter(_module(dataset).train_dataloader()), 1)
    assert set(batch) == {"tokens", "document_ids", "targets"}
    for value in batch.values():
        assert value.shape == (4, 16) and value.dtype == torch.int64
    tokens, ids, targets = batch["tokens"], batch["document_ids"], batch["targets"]
    predicted = targets != IGNORE_INDEX
    # synthetic tokens count up inside a document, so every kept target is the next token
    assert torch.equal(targets[predicted], tokens[predicted] + 1)
    assert (ids[:, 0] == 0).all() and (ids.diff(dim=1) >= 0).all()
    # the last position of each document has no target (its successor belongs to another one)
    boundary = torch.cat([ids.diff(dim=1) != 0, torch.zeros(4, 1, dtype=torch.bool)], dim=1)
    assert (targets[boundary] == IGNORE_INDEX).all()


def test_the_stream_is_deterministic_for_a_seed(dataset):
    first = _take(iter(_module(dataset).train_dataloader()), 6)
    _assert_same(first, _take(iter(_module(dataset).train_dataloader()), 6))
    other = _take(iter(_module(dataset, seed=8).train_dataloader()), 6)
    assert not all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, other, strict=True))


def test_mixture_weights_hold(dataset):
    dm = _module(dataset, seq_len=4)
    dm.weights = [0.7, 0.3]
    stream = dm.train_dataloader().dataset
    picks = _take(stream.mixed_samples(), 4000)
    share = np.mean([index == 0 for index, _ in picks])
    assert share == pytest.approx(0.7, abs=0.025)
    assert all(source_of(sample.tokens[0]) == index for index, sample in picks)  # the right source's data


def test_a_zero_weight_source_is_never_read(dataset):
    dm = PackedDataModule(
        str(dataset), {"a": {"weight": 1.0}, "b": {"weight": 0.0}}, seq_len=16, num_workers=0
    )
    tokens = torch.cat([b["tokens"] for b in _take(iter(dm.train_dataloader()), 30)])
    assert (tokens < SOURCE_OFFSET).all()


def test_set_weights_changes_the_next_loaders_mixture(dataset):
    dm = _module(dataset)
    dm.set_weights({"b": 0.0})  # a keeps its configured weight
    assert dm.weights == [0.5, 0.0]
    tokens = torch.cat([b["tokens"] for b in _take(iter(dm.train_dataloader()), 30)])
    assert (tokens < SOURCE_OFFSET).all()
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['c'\]"):
        dm.set_weights({"c": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        dm.set_weights({"a": 0.0, "b": 0.0})
    assert dm.weights == [0.5, 0.0]  # a refused change leaves the mixture alone


def test_seq_len_and_batch_size_change_at_the_next_loader(dataset):
    dm = _module(dataset)
    dm.set_seq_len(40)
    dm.set_batch_size(3)
    (batch,) = _take(iter(dm.train_dataloader()), 1)
    assert batch["tokens"].shape == (3, 40)
    predicted = batch["targets"] != IGNORE_INDEX
    assert torch.equal(batch["targets"][predicted], batch["tokens"][predicted] + 1)
    with pytest.raises(ValueError, match="data.seq_len must be a positive integer"):
        dm.set_seq_len(0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_exact_next_batch(dataset, num_workers):
    dm = _module(dataset, num_workers=num_workers)
    stream = iter(dm.train_dataloader())
    _take(stream, 7)  # an odd count: the worker that goes first changes
    state = dm.state_dict()
    expected = _take(stream, 5)
    resumed = _module(dataset, num_workers=num_workers)
    resumed.load_state_dict(state)
    _assert_same(_take(iter(resumed.train_dataloader()), 5), expected)


def test_a_new_epoch_of_the_same_loader_does_not_repeat(dataset):
    dm = _module(dataset)
    loader = dm.train_dataloader()
    first = _take(iter(loader), 3)
    again = _take(iter(loader), 3)  # Lightning re-iterates the loader each epoch
    whole = _take(iter(_module(dataset).train_dataloader()), 6)
    _assert_same(first + again, whole)


def _tokens(batches):
    return {int(t) for b in batches for t in b["tokens"].reshape(-1)}


def test_resume_after_a_seq_len_ramp_and_no_repeats_across_it(dataset):
    dm = _module(dataset)
    before = _take(iter(dm.train_dataloader()), 6)
    dm.set_seq_len(24)
    dm.set_batch_size(3)
    stream = iter(dm.train_dataloader())
    after = _take(stream, 4)
    state = dm.state_dict()
    expected = _take(stream, 4)
    assert not _tokens(before) & _tokens(after + expected)  # the new segment continues, it does not restart
    resumed = _module(dataset)
    resumed.load_state_dict(state)
    resumed.set_seq_len(24)
    resumed.set_batch_size(3)
    _assert_same(_take(iter(resumed.train_dataloader()), 4), expected)
    assert [s["batches"] for s in state["segments"]] == [6, 4]


def test_changing_the_worker_count_restarts_with_a_warning(dataset, caplog):
    dm = _module(dataset)
    _take(iter(dm.train_dataloader()), 3)
    dm.num_workers = 2
    with caplog.at_level(logging.WARNING, logger="herd.data.loaders.packed"):
        (batch,) = _take(iter(dm.train_dataloader()), 1)
    assert "read positions cannot carry over" in caplog.text
    assert batch["tokens"].shape == (4, 16)
    assert dm.state_dict()["segments"][-1]["plan"]["epoch"] == 1


def test_val_reads_every_val_row_once(dataset):
    dm = _module(dataset, seq_len=16, batch_size=5)
    batches = list(dm.val_dataloader())
    firsts = sorted(int(t) for b in batches for t in b["tokens"][:, 0])
    expected = [k * SOURCE_OFFSET + 3000 + r * ROW_LEN for k in (0, 1) for r in range(-(-300 // ROW_LEN))]
    assert firsts == expected
    assert [len(b["tokens"]) for b in batches] == [5, 5, 5, 5, 5, 5, 5, 1]
    _assert_same(list(dm.test_dataloader()), batches)  # the test loop reads the val split


def test_val_batches_are_equal_on_every_rank(dataset, monkeypatch):
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = _module(dataset, batch_size=2)
        loader = dm.val_dataloader()
        counts.append(sum(1 for _ in loader))
        plan = dm._plan(2, 2)
        per_rank = val_batches_per_rank(dm._val, plan)
    assert per_rank[0] != per_rank[1]  # the shards split unevenly ...
    assert counts == [min(per_rank)] * 2  # ... yet both ranks yield the same number of batches


def test_expected_vocab_and_fingerprint_are_enforced(dataset):
    _module(dataset, expected_vocab_size=65536, expected_tokenizer_fingerprint="0" * 64)
    with pytest.raises(
        ManifestError, match=f"expects 8192 but the shards in {dataset}/manifest.json.* of 65536"
    ):
        _module(dataset, expected_vocab_size=8192)
    with pytest.raises(
        ManifestError, match=f"expects abc but the shards in {dataset}/manifest.json.* with 0000"
    ):
        _module(dataset, expected_tokenizer_fingerprint="abc")


def test_sources_with_different_tokenizers_are_refused(dataset, tmp_path):
    other = write_dataset(tmp_path, {"c": (400, 0)}, ROW_LEN, 8, fingerprint="1" * 64)
    with pytest.raises(ManifestError, match="sources use different tokenizers"):
        PackedDataModule(str(dataset), {"a": {}, "c": {"data_dir": str(other)}})


def test_missing_data_dir_names_itself(tmp_path):
    with pytest.raises(ManifestError, match=f"manifest not found: {tmp_path}/nothing/manifest.json"):
        PackedDataModule(str(tmp_path / "nothing"))


def test_too_few_shards_for_the_readers(dataset):
    dm = PackedDataModule(
        str(dataset), {"a": {"train": f"{dataset}/a/train-{{000000..000002}}.tar"}}, num_workers=4
    )
    with pytest.raises(ManifestError, match="has 3 train shards, fewer than the 1 ranks x 4 workers"):
        dm.train_dataloader()


def test_a_seq_len_longer_than_a_readers_pass_is_explained(dataset):
    dm = _module(dataset, seq_len=5000)
    with pytest.raises(ValueError, match="not one sample of seq_len \\+ 1 = 5001: lower seq_len"):
        _take(iter(dm.train_dataloader()), 1)


def test_explicit_shard_lists_must_belong_to_the_manifest(dataset, tmp_path):
    with pytest.raises(ManifestError, match="shard .*/elsewhere/x-000000.tar is not listed"):
        PackedDataModule(str(dataset), {"a": {"train": [str(tmp_path / "elsewhere" / "x-000000.tar")]}})


def _damaged_copy(dataset, tmp_path):
    copy = write_dataset(tmp_path / "copy", {"a": (3000, 300), "b": (3000, 300)}, ROW_LEN, 8)
    shard = copy / "a" / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return copy, shard


def test_a_corrupt_shard_stops_reading_with_its_name(dataset, tmp_path):
    copy, shard = _damaged_copy(dataset, tmp_path)
    with pytest.raises(ShardError, match=f"shard {shard} is corrupt or truncated"):
        _take(iter(_module(copy).train_dataloader()), 200)


def test_corrupt_shards_can_be_skipped_with_a_counted_warning(dataset, tmp_path, caplog):
    copy, _ = _damaged_copy(dataset, tmp_path)
    with caplog.at_level(logging.WARNING, logger="herd.data.loaders.stream"):
        batches = _take(iter(_module(copy, on_corrupt_shard="skip").train_dataloader()), 120)
    assert "skipped shard (1 so far on this reader)" in caplog.text
    damaged_rows = range(3 * 8 * ROW_LEN, 4 * 8 * ROW_LEN)  # source a's rows 24..31
    assert not _tokens(batches) & set(damaged_rows)


def test_data_configs_instantiate(dataset):
    for name, sources in (
        ("stdlib", ("prose", "code")),
        ("llama3_mix", ("general", "math", "code", "multilingual")),
    ):
        folder = write_dataset(dataset.parent / f"cfg-{name}", dict.fromkeys(sources, (800, 100)), ROW_LEN, 8)
        data = OmegaConf.load(repo_root() / "configs" / "data" / f"{name}.yaml")
        cfg = OmegaConf.create(
            {"seed": 3, "model": {"vocab_size": 65536}, "data": data}
        )  # as composed by train
        cfg.data.data_dir = str(folder)
        dm = instantiate(cfg.data)
        assert isinstance(dm, PackedDataModule)
        assert dm.names == list(sources)
        assert dm.tokenizer == f"{folder}/tokenizer"
        assert dm.seed == 3
    assert dm.weights == [0.5, 0.25, 0.17, 0.08]


class _Recorder(L.LightningModule):
    """Records the tokens of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["tokens"].clone())
        return (self.w * batch["tokens"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dataset, max_steps, ckpt_dir, ckpt_path=None, **trainer_options):
    recorder = _Recorder()
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[checkpoints], **trainer_options,
    )  # fmt: skip
    trainer.fit(recorder, datamodule=_module(dataset, num_workers=2), ckpt_path=ckpt_path)
    return recorder.seen


def test_lightning_resume_from_a_checkpoint_continues_exactly(dataset, tmp_path):
    full = _fit(dataset, 7, tmp_path / "first")
    resumed = _fit(dataset, 7, tmp_path / "second", ckpt_path=tmp_path / "first" / "step=3.ckpt")
    assert len(resumed) == 4
    for got, expected in zip(resumed, full[3:], strict=True):
        assert torch.equal(got, expected)
    # short epochs that re-create the loader every epoch read the same stream too
    epochs = _fit(dataset, 7, tmp_path / "third", limit_train_batches=2, reload_dataloaders_every_n_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(epochs, full, strict=True))


def test_a_manifest_listing_a_pipe_command_is_refused_and_never_runs(tmp_path):
    folder = write_dataset(tmp_path / "prepared", {"a": (800, 100)}, ROW_LEN, 8)
    marker = tmp_path / "pwned"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sources"]["a"]["splits"]["train"]["shards"][1]["path"] = f"pipe:touch {marker}"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    message = f"manifest {folder}/manifest.json: sources.a.splits.train.shards\\[1\\].path .* is refused"
    with pytest.raises(ManifestError, match=message):
        PackedDataModule(str(folder), num_workers=0)
    with pytest.raises(ManifestError, match=message):  # explicit shard lists are matched to the manifest
        PackedDataModule(str(folder), {"a": {"train": [f"{folder}/a/train-000000.tar"]}}, num_workers=0)
    assert not marker.exists()


def _damage(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _skips_per_reader(dm, batches, num_workers, monkeypatch):
    """The skip count each reader of ``dm``'s train stream reports with its share of ``batches``."""
    stream = dm.train_dataloader().dataset
    counts = []
    for worker in range(max(1, num_workers)):
        if num_workers:  # play DataLoader worker ``worker`` in this process
            info = SimpleNamespace(id=worker, num_workers=num_workers)
            monkeypatch.setattr("herd.data.loaders.stream.get_worker_info", lambda info=info: info)
        share = batches_before(batches, worker, max(1, num_workers))
        counts.append(int(_take(iter(stream), share)[-1]["skipped_shards"]))
    return counts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_shards_are_totalled_over_loaders_and_workers(dataset, tmp_path, num_workers, monkeypatch):
    copy, _ = _damaged_copy(dataset, tmp_path)  # train shard a/train-000003
    _damage(copy / "a" / "train-000010.tar")
    _damage(copy / "a" / "val-000000.tar")
    _damage(copy / "b" / "val-000002.tar")  # the last val shard its reader reads
    dm = _module(copy, on_corrupt_shard="skip", num_workers=num_workers)
    assert dm.skipped_shards == 0
    val = list(dm.val_dataloader())
    assert dm.skipped_shards == 2  # counted on this process, the trailing skip included
    train = _take(iter(dm.train_dataloader()), 200)
    for batch in val + train:  # the stages see the batches they always saw
        assert set(batch) == {"tokens", "document_ids", "targets"}
    expected = _skips_per_reader(_module(copy, on_corrupt_shard="skip", num_workers=num_workers), 200,
                                 num_workers, monkeypatch)  # fmt: skip
    assert all(count > 0 for count in expected)  # every reader skipped some
    assert dm.skipped_shards == 2 + sum(expected)
    assert _module(dataset, num_workers=num_workers).skipped_shards == 0
