"""RoPE: each scaling type's frequencies and attention factor against transformers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from herd.model import ModelConfig, RopeScaling, Transformer
from herd.model.rope import RotaryEmbedding, attention_factor, dynamic_frequencies, inverse_frequencies

HEAD_DIM, THETA, ORIGINAL = 16, 100.0, 32
SHORT = [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)]
LONG = [1.0 + 0.7 * i for i in range(HEAD_DIM // 2)]
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                 "short_factor": SHORT, "long_factor": LONG},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}


def transformers_rope(values: dict, seq_len=None) -> tuple[torch.Tensor, float]:
    """transformers' (inv_freq, attention factor) for a Llama with HEAD_DIM and these rope_parameters."""
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=ORIGINAL,
                         rope_parameters={**values, "rope_theta": THETA})
    return ROPE_INIT_FUNCTIONS[values["rope_type"]](config, None, seq_len=seq_len)


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_frequencies_and_attention_factor_match_transformers(name):
    values = SCALINGS[name]
    values = {**values, "original_max_position_embeddings": ORIGINAL} if name == "dynamic" else values
    scaling = RopeScaling(**values)
    expected, expected_factor = transformers_rope(SCALINGS[name])
    got = inverse_frequencies(HEAD_DIM, THETA, scaling)
    if name == "dynamic":  # within the original length dynamic NTK is plain RoPE
        expected = transformers_rope({"rope_type": "linear", "factor": 1.0})[0]
    torch.testing.assert_close(got, expected, rtol=3e-7, atol=0)
    assert attention_factor(scaling) == pytest.approx(expected_factor, rel=1e-12)
    if name == "longrope":  # past the original length: the long factors
        long, _ = transformers_rope(SCALINGS[name], seq_len=ORIGINAL + 1)
        torch.testing.assert_close(inverse_frequencies(HEAD_DIM, THETA, scaling, long=True), long, rtol=3e-7, atol=0)
    if name == "dynamic":  # past it: theta grows with the length, computed as transformers does (float32)
        grown, _ = transformers_rope(SCALINGS[name], seq_len=torch.tensor(48))
        assert torch.equal(dynamic_frequencies(HEAD_DIM, THETA, scaling, torch.tensor(48)), grown)


def test_llama3_frequencies_are_bit_identical_to_the_original_formula():
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert scaling == RopeScaling() and scaling.rope_type == "llama3"  # Meta's values are the defaults
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    wavelength = 2 * math.pi / freqs  # the formula before rope_type existed, written out
    smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
    blended = (1 - smooth) * freqs / 8.0 + smooth * freqs
    scaled = torch.where(wavelength > 8192 / 1.0, freqs / 8.0, blended)
    expected = torch.where(wavelength < 8192 / 4.0, freqs, scaled).to(torch.float32)
    assert torch.equal(inverse_frequencies(128, 500000.0, scaling), expected)
    assert attention_factor(scaling) == 1.0


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_length_dependent_types_switch_once_positions_pass_the_original_length(name):
    scaling = RopeScaling(**{**SCALINGS[name], "original_max_position_embeddings": ORIGINAL})
    rope = RotaryEmbedding(HEAD_DIM, THETA, scaling)
    within = torch.arange(ORIGINAL)[None]  # largest position ORIGINAL - 1: seq_len == ORIGINAL
    past = torch.arange(ORIGINAL + 1)[None]
    assert torch.equal(rope.frequencies(within), rope.inv_freq)
    assert not torch.allclose(rope.frequencies(past), rope.inv_freq)
    # the length is the largest position over the batch (a packed row that restarts stays short)
    assert torch.equal(rope.frequencies(torch.cat([within, within]) % 8), rope.inv_freq)


@pytest.mark.parametrize("name", ["yarn", "longrope"])
def test_attention_factor_scales_cos_and_sin(name):
    scaling = RopeScaling(**SCALINGS[name])
    cos, sin = RotaryEmbedding(HEAD_DIM, THETA, scaling)(torch.arange(4)[None])
    factor = attention_factor(scaling)
    assert factor > 1.0
    torch.testing.assert_close(cos[0, 0], torch.full((HEAD_DIM,), factor))
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, factor**2))


def test_set_context_changes_the_rope_type_of_a_built_model():
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=50, rope_theta=THETA))
    plain = model.rope.inv_freq.clone()
    model.set_context(rope_scaling=SCALINGS["longrope"])
    assert model.config.rope_scaling.rope_type == "longrope"
    torch.testing.assert_close(model.rope.inv_freq, plain / torch.tensor(SHORT))
    torch.testing.assert_close(model.rope.long_inv_freq, plain / torch.tensor(LONG))
    model.set_context(rope_scaling=None)
    assert torch.equal(model.rope.inv_freq, plain) and model.rope.attention_factor == 1.0
