"""python -m herd.average: the weighted mean of model directories, and the mismatches it refuses."""

from __future__ import annotations

import inspect
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from herd.average import AverageError, average, normalised_weights
from herd.data.tokenizer import train_tokenizer
from herd.interop import hf
from herd.model import ModelConfig, RewardModel, Transformer

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=640, multiple_of=16, max_seq_len=128)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in hf.weight_files(directory):
        out |= load_file(str(file))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three random policies and two random reward models of one shape, with one 600-id tokenizer."""
    root = tmp_path_factory.mktemp("average")
    train_tokenizer([inspect.getsource(textwrap)], vocab_size=600).save(root / "tokenizer")
    out = {}
    for index in range(3):
        torch.manual_seed(index)
        out[f"policy{index}"] = hf.save(Transformer(CONFIG), root / f"policy{index}", tokenizer=root / "tokenizer")
    for index in range(2):
        torch.manual_seed(10 + index)
        reward = RewardModel(Transformer(CONFIG))
        torch.nn.init.normal_(reward.head.weight)
        out[f"reward{index}"] = hf.save_reward_model(reward.backbone, reward.head.weight, root / f"reward{index}",
                                                     tokenizer=root / "tokenizer")
    out["tokenizer"] = root / "tokenizer"
    return out


def test_the_average_is_the_elementwise_weighted_mean(models, tmp_path):
    sources = [models[f"policy{i}"] for i in range(3)]
    out = average(sources, tmp_path / "mean", weights=[2, 1, 1])
    inputs = [_tensors(path) for path in sources]
    averaged = _tensors(out)
    assert set(averaged) == set(inputs[0])
    for name, tensor in averaged.items():
        expected = 0.5 * inputs[0][name] + 0.25 * inputs[1][name] + 0.25 * inputs[2][name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
        assert tensor.dtype == inputs[0][name].dtype
    assert json.loads((out / "average.json").read_text())["weights"] == [0.5, 0.25, 0.25]
    assert (out / "tokenizer.json").read_text() == (sources[0] / "tokenizer.json").read_text()
    assert hf.load(out).config == hf.load(sources[0]).config  # a model directory herd loads as it is


def test_reward_models_average_with_their_heads_and_into_shards(models, tmp_path):
    sources = [models["reward0"], models["reward1"]]
    out = average(sources, tmp_path / "rm", max_shard_bytes=40_000, dtype=torch.bfloat16)
    assert (out / hf.SAFETENSORS_INDEX).is_file() and len(hf.weight_files(out)) > 1
    heads = [hf.read_reward_head(path, CONFIG.dim) for path in sources]
    model = hf.load_reward_model(out)
    torch.testing.assert_close(model.head.weight, ((heads[0] + heads[1]) / 2).to(torch.bfloat16))
    assert hf.is_reward_model(out) and model.head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000], ids=["single", "sharded"])
def test_averaged_files_all_get_the_umask_mode_as_exports_do(models, tmp_path, max_shard_bytes):
    previous = os.umask(0o027)
    try:
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        out = average([models["policy0"], models["policy1"]], tmp_path / "mean", **kwargs)
    finally:
        os.umask(previous)
    modes = {file.name: oct(stat.S_IMODE(file.stat().st_mode)) for file in out.iterdir()}
    weights = [name for name in modes if name.endswith(".safetensors")]
    assert len(weights) == len(hf.weight_files(out)) and (len(weights) > 1) is (max_shard_bytes is not None)
    assert {"config.json", "tokenizer.json", "average.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, oct(0o640))


def test_weights_are_normalised_or_refused():
    assert normalised_weights(None, 4) == [0.25] * 4
    assert normalised_weights([3, 1], 2) == [0.75, 0.25]
    for bad in ([1, -1], [0, 0], [1.0, float("nan")], [1, 2, 3]):
        with pytest.raises(AverageError, match="weights"):
            normalised_weights(bad, 2)


def _save(config: ModelConfig, path: Path, tokenizer: Path) -> Path:
    return hf.save(Transformer(config), path, tokenizer=tokenizer)


def test_mismatches_are_refused_naming_the_difference(models, tmp_path):
    policy, tokenizer = models["policy0"], models["tokenizer"]
    deeper = _save(ModelConfig(**{**CONFIG.to_dict(), "n_layers": 3}), tmp_path / "deeper", tokenizer)
    wider_vocab = _save(ModelConfig(**{**CONFIG.to_dict(), "vocab_size": 704}), tmp_path / "vocab", tokenizer)
    train_tokenizer([inspect.getsource(json.decoder)], vocab_size=600).save(tmp_path / "other_tokenizer")
    other_tokenizer = _save(CONFIG, tmp_path / "other_tok_model", tmp_path / "other_tokenizer")
    longer = _save(ModelConfig(**{**CONFIG.to_dict(), "max_seq_len": 256}), tmp_path / "longer", tokenizer)
    cases = [
        (models["reward0"], "different architectures: LlamaForCausalLM vs LlamaForSequenceClassification"),
        (deeper, "different shapes: n_layers 2 vs 3"),
        (wider_vocab, "different vocabularies: vocab_size 640 vs 704"),
        (other_tokenizer, "different tokenizers"),
        (longer, "max_position_embeddings: 128 vs 256"),
    ]
    for other, message in cases:
        with pytest.raises(AverageError, match=message) as caught:
            average([policy, other], tmp_path / "never")
        assert str(policy) in str(caught.value) and str(other) in str(caught.value)
        assert not (tmp_path / "never").exists()
    with pytest.raises(AverageError, match="already exists"):
        average([policy, models["policy1"]], models["policy2"])


def test_command_line_writes_the_average_and_refuses_with_status_2(models, tmp_path):
    command = [sys.executable, "-m", "herd.average", f"models=[{models['policy0']},{models['policy1']}]"]
    done = subprocess.run([*command, f"output={tmp_path / 'avg'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "x 0.5" in done.stdout and (tmp_path / "avg" / hf.SAFETENSORS_FILE).is_file()
    refused = subprocess.run([*command, f"output={tmp_path / 'avg'}", "weights=[1]"], capture_output=True, text=True)
    assert refused.returncode == 2 and "weights has 1 values for 2 models" in refused.stderr


def test_a_damaged_safetensors_file_is_named_in_one_line(models, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(models["policy1"], damaged)
    weights = damaged / hf.SAFETENSORS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    done = subprocess.run([sys.executable, "-m", "herd.average", f"models=[{models['policy0']},{damaged}]",
                           f"output={tmp_path / 'avg'}", f"hydra.run.dir={tmp_path / 'log'}"],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"herd.average: {weights} is not a readable safetensors file")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize(("damaged", "named"), [("tokenizer.json", "is not a valid tokenizer.json"),
                                                ("tokenizer_config.json", "is not valid JSON")])
def test_an_invalid_tokenizer_file_is_named_not_another(models, tmp_path, damaged, named):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(models["policy1"], copy)
    (copy / damaged).write_text("{not json")
    with pytest.raises(AverageError) as error:
        average([models["policy0"], copy], tmp_path / "avg")
    assert str(error.value).startswith(f"{copy / damaged} {named}")
    assert "\n" not in str(error.value) and not (tmp_path / "avg").exists()
