"""ModelConfig: derived values, presets and the errors for impossible shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from herd.model import ModelConfig, RopeScaling, Transformer
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
        ({"dim": 64, "n_heads": 4, "head_dim": 15}, "model.head_dim=15 must be even"),
        ({"dim": 64, "n_heads": 4, "head_dim": 0}, "model.head_dim must be a positive integer"),
        ({"attention_bias": "yes"}, "model.attention_bias must be true or false"),
        ({"rope_scaling": {"rope_type": "ntk", "factor": 2.0}}, "rope_type='ntk' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
         "rope_scaling.original_max_position_embeddings is required by rope_type 'yarn'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 8}},
         "rope_scaling.beta_fast is not used by rope_type 'linear'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "rope_scaling.factor must be > 0"),
        ({"dim": 64, "n_heads": 4, "rope_scaling": {"rope_type": "longrope", "factor": 2.0,
                                                    "original_max_position_embeddings": 32,
                                                    "short_factor": [1.0] * 8, "long_factor": [1.0] * 7}},
         "rope_scaling.long_factor has 7 values; it needs one per frequency, head_dim / 2 = 8"),
        ({"rope_scaling": {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}}, "high_freq_factor >"),
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


def test_head_dim_override_sizes_the_attention_projections():
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, head_dim=32, multiple_of=16)
    model = Transformer(config)
    attention = model.layers[0].attention
    assert config.head_dim == 32
    assert attention.wq.weight.shape == (4 * 32, 64) and attention.wo.weight.shape == (64, 4 * 32)
    assert attention.wk.weight.shape == attention.wv.weight.shape == (2 * 32, 64)
    assert model.rope.inv_freq.shape == (16,)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    assert model(torch.randint(0, 50, (2, 8))).shape == (2, 8, 50)
    assert config.flops_per_token(8) > ModelConfig(**{**config.to_dict(), "head_dim": None}).flops_per_token(8)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_derived_head_dim_is_stored_as_none_so_an_edited_shape_derives_it_again():
    config = ModelConfig(dim=64, n_heads=4)
    assert config.head_dim == 16 and config.to_dict()["head_dim"] is None
    assert ModelConfig.from_dict({**config.to_dict(), "dim": 128}).head_dim == 32


@pytest.mark.parametrize(("attention_bias", "mlp_bias"), [(True, False), (False, True), (True, True)])
def test_biases_are_counted_and_start_at_zero(attention_bias, mlp_bias):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                         attention_bias=attention_bias, mlp_bias=mlp_bias)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    biases = {name: p for name, p in model.named_parameters() if name.endswith(".bias")}
    assert len(biases) == config.n_layers * (4 * attention_bias + 3 * mlp_bias)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases.values())
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    assert config.num_params() > ModelConfig(**{**config.to_dict(), "attention_bias": False,
                                                "mlp_bias": False}).num_params()
    plain = ModelConfig(**{**config.to_dict(), "attention_bias": False, "mlp_bias": False})
    named = " ".join(config.architecture_differences(plain))
    assert ("model.attention_bias" in named) is attention_bias and ("model.mlp_bias" in named) is mlp_bias


def test_a_config_stored_before_the_new_fields_means_the_same_model():
    """A checkpoint's stored config from before head_dim, the biases and rope_type loads as before."""
    stored = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 50, "ffn_dim_multiplier": None,
              "multiple_of": 16, "intermediate_size": None, "norm_eps": 1e-5, "rope_theta": 500000.0,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192},
              "max_seq_len": 2048, "tie_embeddings": True, "attention": "sdpa"}
    config = ModelConfig.from_dict(stored)
    assert config.head_dim == 16 and not config.attention_bias and not config.mlp_bias
    assert config.rope_scaling == RopeScaling() and config.rope_scaling.rope_type == "llama3"
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert sorted(p for p, _ in Transformer(config).named_parameters() if p.endswith(".bias")) == []


# model=checkpoint is no shape of its own: it reads stage.init_from's (tests/train/test_train.py)
@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).parents[2] / "configs" / "model").glob("*.yaml")
                                        if p.stem != "checkpoint"),
                         ids=lambda p: p.stem)
def test_every_model_preset_still_loads_and_round_trips(path):
    config = model_preset(path.stem)
    assert not config.attention_bias and not config.mlp_bias and config.head_dim == config.dim // config.n_heads
    if config.rope_scaling is not None:
        assert config.rope_scaling.rope_type == "llama3"
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("values", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0, "mscale": 1.0,
     "mscale_all_dim": 1.0, "truncate": False},
    {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 64, "short_factor": [1.0] * 8,
     "long_factor": [2.0] * 8, "attention_factor": 1.1},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
], ids=lambda v: v["rope_type"])
def test_every_rope_type_round_trips_through_dict(values):
    config = ModelConfig(dim=64, n_heads=4, rope_scaling=values)
    assert config.rope_scaling.to_dict() == values
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert isinstance(hash(config.rope_scaling), int)  # frozen and hashable (tuples, not lists)
