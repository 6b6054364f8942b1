"""Checkpoint I/O: atomic single-file writes, completeness, clean-up after a killed save, metadata, and safe reading of sharded folders."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from herd.model import ModelConfig
from herd.stages.checkpoint_io import (
    AtomicCheckpointIO,
    UnsafeCheckpointError,
    check_dcp_metadata,
    checkpoint_is_complete,
    checkpoint_metadata,
    load_sharded,
    publish_checkpoint,
    recoverable_checkpoint,
    remove_stale_temporaries,
    sharded_temporary,
)


def test_atomic_checkpoint_survives_a_write_that_dies_midway(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def herd_entry() -> dict:
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64)
    return {"tokens_seen": 640, "model_config": config.to_dict()}


def write_sharded(folder: Path, step: int, extra: dict | None = None) -> Path:
    """A sharded checkpoint as Lightning's ModelParallelStrategy lays it out, written by one process."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"model.tok_embeddings.weight": torch.full((64, 32), float(step))},
             "optimizer_0": {"param_groups": [{"lr": 0.01, "betas": (0.9, 0.95)}]}, **(extra or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": step, "epoch": 0, "herd": herd_entry()}, folder / "meta.pt")
    return folder


class WritesMarker:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_complete_file_and_folder_are_recognised_and_leftovers_are_not(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(100)}}, ckpt)
    assert checkpoint_is_complete(ckpt)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:-200])
    assert not checkpoint_is_complete(truncated)
    temporary = tmp_path / f"last.ckpt.tmp-{os.getpid()}"
    temporary.write_bytes(ckpt.read_bytes())
    assert not checkpoint_is_complete(temporary)

    folder = write_sharded(tmp_path / "sharded.ckpt", 4)
    assert checkpoint_is_complete(folder)
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert not checkpoint_is_complete(folder)  # a shard cut short
    shard.unlink()
    assert not checkpoint_is_complete(folder)
    no_meta = write_sharded(tmp_path / "no_meta.ckpt", 4)
    (no_meta / "meta.pt").unlink()
    assert not checkpoint_is_complete(no_meta)
    assert not checkpoint_is_complete(write_sharded(sharded_temporary(tmp_path / "x.ckpt", 4), 4))
    assert not checkpoint_is_complete(tmp_path / "missing.ckpt")


def test_metadata_without_the_weights(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 7, "epoch": 1, "herd": herd_entry(), "state_dict": {"w": torch.ones(4)},
                "optimizer_states": [{}], "loops": {"fit_loop": {}}}, ckpt)
    meta = checkpoint_metadata(ckpt)
    assert meta["global_step"] == 7 and meta["epoch"] == 1 and meta["herd"]["tokens_seen"] == 640
    assert "state_dict" not in meta and "optimizer_states" not in meta and "loops" in meta
    assert checkpoint_metadata(write_sharded(tmp_path / "sharded.ckpt", 4))["herd"] == herd_entry()

    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        checkpoint_metadata(not_a_checkpoint)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder"):
        checkpoint_metadata(tmp_path / "folder")
    with pytest.raises(FileNotFoundError):
        checkpoint_metadata(tmp_path / "missing.ckpt")


def test_stale_temporaries_are_removed_and_an_interrupted_swap_is_rolled_back(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt.tmp-1234").write_bytes(b"half a file")  # AtomicCheckpointIO, killed
    write_sharded(checkpoints / "best.ckpt.tmp-step8", 8)  # a sharded save killed before publishing
    write_sharded(checkpoints / "last.ckpt.old-99", 4)  # a swap killed between its two renames
    write_sharded(checkpoints / "best.ckpt", 6)
    write_sharded(checkpoints / "best.ckpt.old-98", 2)  # a swap killed while deleting the old one
    changed = remove_stale_temporaries(checkpoints)
    assert sorted(p.name for p in changed) == ["best.ckpt.old-98", "best.ckpt.tmp-step8", "last.ckpt",
                                               "last.ckpt.tmp-1234"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert checkpoint_metadata(checkpoints / "last.ckpt")["global_step"] == 4  # the previous one, restored
    assert checkpoint_metadata(checkpoints / "best.ckpt")["global_step"] == 6
    assert remove_stale_temporaries(checkpoints) == []
    assert recoverable_checkpoint(checkpoints / "other.ckpt") is None
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_publish_killed_between_its_renames_leaves_the_previous_checkpoint_recoverable(tmp_path, monkeypatch):
    target = write_sharded(tmp_path / "last.ckpt", 2)
    new = write_sharded(sharded_temporary(target, 4), 4)
    rename, calls = os.rename, []

    def dying_rename(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        publish_checkpoint(new, target)
    monkeypatch.undo()
    assert not target.exists() and any(checkpoint_is_complete(p) for p in tmp_path.glob("last.ckpt.old-*"))
    survivor = recoverable_checkpoint(target)  # found without changing the folder
    assert survivor.name.startswith("last.ckpt.old-") and checkpoint_metadata(survivor)["global_step"] == 2
    remove_stale_temporaries(tmp_path)
    assert recoverable_checkpoint(target) == target
    assert checkpoint_metadata(target)["global_step"] == 2 and checkpoint_is_complete(target)

    publish_checkpoint(write_sharded(sharded_temporary(target, 4), 4), target)  # uninterrupted
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert checkpoint_metadata(target)["global_step"] == 4


def test_a_real_index_reads_and_loads_through_the_safe_readers(tmp_path):
    folder = write_sharded(tmp_path / "sharded.ckpt", 4)
    metadata = check_dcp_metadata(folder)
    assert "state_dict.model.tok_embeddings.weight" in metadata.state_dict_metadata
    assert check_dcp_metadata(folder / ".metadata").state_dict_metadata == metadata.state_dict_metadata
    state = {"state_dict": {"model.tok_embeddings.weight": torch.zeros(64, 32)},
             "optimizer_0": {"param_groups": [{"lr": None, "betas": None}]}}
    load_sharded(state, folder)
    assert state["state_dict"]["model.tok_embeddings.weight"].eq(4.0).all()
    assert state["optimizer_0"]["param_groups"][0] == {"lr": 0.01, "betas": (0.9, 0.95)}


def craft_index(folder: Path, marker: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))


def test_a_crafted_index_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    folder = write_sharded(tmp_path / "sharded.ckpt", 4)
    craft_index(folder, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"sharded\.ckpt/\.metadata.*not a checkpoint herd can read safely"):
        check_dcp_metadata(folder)
    with pytest.raises(UnsafeCheckpointError):
        load_sharded({"state_dict": {"model.tok_embeddings.weight": torch.zeros(64, 32)}}, folder)
    assert not checkpoint_is_complete(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(torch.Size([3])))  # only allowed classes, but not an index
    with pytest.raises(UnsafeCheckpointError, match="not a torch.distributed.checkpoint Metadata"):
        check_dcp_metadata(folder)
    (folder / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="not a readable"):
        check_dcp_metadata(folder)
    with pytest.raises(ValueError, match="no .metadata"):
        check_dcp_metadata(tmp_path)
    assert not marker.exists()


def test_a_crafted_non_tensor_item_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    folder = write_sharded(tmp_path / "sharded.ckpt", 4, extra={"callback": WritesMarker(marker)})
    with pytest.raises(UnsafeCheckpointError, match="'callback' is not plain data"):
        load_sharded({"callback": None}, folder)
    assert not marker.exists()


@pytest.mark.slow
def test_export_refuses_a_crafted_index(tmp_path):
    marker = tmp_path / "marker"
    folder = write_sharded(tmp_path / "sharded.ckpt", 4)
    craft_index(folder, marker)
    result = subprocess.run([sys.executable, "-m", "herd.export", f"checkpoint={folder}", f"output={tmp_path / 'hf'}",
                             f"hydra.run.dir={tmp_path / 'export_log'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "herd.export:" in result.stderr and "not a checkpoint herd can read safely" in result.stderr
    assert not marker.exists() and not (tmp_path / "hf").exists()



def _herd_checkpoint(path: Path) -> Path:
    """A single-file checkpoint as herd writes it: the model's weights and the herd entry."""
    from herd.model import Transformer

    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16)
    weights = {f"model.{k}": v for k, v in Transformer(config).state_dict().items()}
    torch.save({"state_dict": weights, "global_step": 3, "herd": {"model_config": config.to_dict()}}, path)
    return path


@pytest.mark.parametrize(("damage", "error"), [
    ("truncated", r"is not a readable checkpoint \(.*\): it is truncated, damaged or not a torch checkpoint"),
    ("garbage", r"is not a readable checkpoint \(.*\): it is truncated, damaged or not a torch checkpoint"),
    ("crafted", r"is not a checkpoint herd can read safely \(.*GLOBAL posix.system.*\); nothing in it was loaded or run"),
    ("a list", r"is not a checkpoint \(it holds a list, not a dict\)"),
])
def test_export_refuses_a_damaged_or_crafted_checkpoint_file_in_one_line(tmp_path, damage, error):
    from herd.export import export

    path = _herd_checkpoint(tmp_path / "last.ckpt")
    marker = tmp_path / "marker"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "crafted":
        torch.save({"herd": WritesMarker(marker), "state_dict": {}}, path)
    else:
        torch.save([1, 2], path)
    with pytest.raises(ValueError, match=error) as refused:
        export(path, tmp_path / "hf")
    assert str(refused.value).startswith(str(path)) and "\n" not in str(refused.value)
    assert not marker.exists() and not (tmp_path / "hf").exists()
