"""Model-directory files: weights (single and sharded) with the umask's mode, config.json, and the import graph."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from herd.interop import modeldir
from herd.interop.modeldir import CheckpointError


def _state() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each


@pytest.mark.parametrize("max_shard_bytes", [10_000, 1_000], ids=["single", "sharded"])
def test_written_weights_read_back_in_order_with_the_umask_mode(tmp_path, max_shard_bytes):
    previous = os.umask(0o027)
    try:
        modeldir.write_weights(_state(), tmp_path, max_shard_bytes)
    finally:
        os.umask(previous)
    files = modeldir.weight_files(tmp_path)
    assert [f.name for f in files] == (["model.safetensors"] if max_shard_bytes == 10_000 else
                                       [modeldir.shard_file_name(i, 3) for i in (1, 2, 3)])
    read = {name: tensor for _, name, tensor in modeldir.iter_tensors(files, "cpu")}
    assert list(read) == list(_state()) and all(torch.equal(read[n], t) for n, t in _state().items())
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in tmp_path.iterdir()} == {oct(0o640)}


def test_a_second_write_leaves_no_stale_shards(tmp_path):
    modeldir.write_weights(_state(), tmp_path, 1_000)
    modeldir.write_weights(_state(), tmp_path, 10_000)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.safetensors"]


def test_config_json_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        modeldir.read_config_json(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        modeldir.read_config_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    assert modeldir.read_config_json(tmp_path) == {"a": 1}


def test_pickled_weights_are_refused_naming_them(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="never unpickles"):
        modeldir.weight_files(tmp_path)


def test_the_llama_module_does_not_import_the_vision_module():
    """hf <- mllama, never back: no import circle between the two."""
    code = "import sys, herd.interop.hf, herd.interop.speech; print('herd.interop.mllama' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_full_disk_during_an_export_leaves_no_folder_or_the_previous_one(tmp_path, monkeypatch):
    """hf.save writes into a hidden folder and renames it: ENOSPC midway leaves no export/ (not an empty
    one), and over an earlier export leaves that one whole."""
    import errno

    from herd.interop import hf
    from herd.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16))
    save_file = modeldir.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(modeldir, "save_file", full_disk)
    with pytest.raises(OSError, match=f"No space left on device while writing the model directory {tmp_path / 'export'}"):
        hf.save(model, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(modeldir, "save_file", save_file)
    hf.save(model, tmp_path / "export")
    (tmp_path / "export" / "notes.txt").write_text("kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    monkeypatch.setattr(modeldir, "save_file", full_disk)
    with pytest.raises(OSError) as error:
        hf.save(model, tmp_path / "export")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "export")
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    monkeypatch.setattr(modeldir, "save_file", save_file)
    hf.save(model, tmp_path / "export")  # a new write over the old one keeps the files it does not hold
    assert (tmp_path / "export" / "notes.txt").read_text() == "kept"
