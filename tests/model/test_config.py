"""ModelConfig: derived values, presets and the errors for impossible shapes."""

from __future__ import annotations

import pytest
import torch

from herd.model import ModelConfig, Transformer
from herd.presets import model_preset

OFFICIAL_PARAMS = {"llama3_8b": 8.03e9, "llama3_70b": 70.55e9, "llama3_405b": 405.85e9}
OFFICIAL_FFN = {"llama3_8b": 14336, "llama3_70b": 28672, "llama3_405b": 53248, "llama3_2_1b": 8192,
                "llama3_2_3b": 8192}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_big_presets_build_on_meta_with_official_parameter_counts(name):
    config = model_preset(name)
    with torch.device("meta"):
        model = Transformer(config)
    counted = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert counted == config.num_params()
    assert abs(counted - OFFICIAL_PARAMS[name]) / OFFICIAL_PARAMS[name] < 0.005


@pytest.mark.parametrize("name", sorted(OFFICIAL_FFN))
def test_meta_ffn_rule_gives_official_hidden_sizes(name):
    config = model_preset(name)
    assert config.ffn_hidden_dim == OFFICIAL_FFN[name]
    assert config.head_dim in (64, 128)


def test_tiny_preset_is_a_few_million_parameters_and_materialises():
    config = model_preset("tiny")
    model = Transformer(config)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 10e6
    assert model.output.weight is model.tok_embeddings.weight


def test_meta_build_then_init_weights_gives_finite_tied_model():
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=50, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.isfinite(model(torch.randint(0, 50, (2, 8)))).all()
    assert torch.equal(model.rope.inv_freq, Transformer(config).rope.inv_freq)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"dim": 100, "n_heads": 8}, "model.n_heads"),
        ({"dim": 64, "n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
        ({"dim": 0}, "model.dim"),
        ({"attention": "magic"}, "model.attention"),
        ({"dim": 60, "n_heads": 4}, "head_dim"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_impossible_shapes_raise_value_error_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        ModelConfig(**kwargs)


def test_unknown_preset_key_is_named():
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict({"n_layer": 3})


def test_round_trip_through_dict():
    config = model_preset("llama3_8b")
    assert ModelConfig.from_dict(config.to_dict()) == config
