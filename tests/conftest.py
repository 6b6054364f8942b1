"""Shared fixtures: tiny model configs and a deterministic seed for every test."""

from __future__ import annotations

import pytest
import torch

from herd.model import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_config() -> ModelConfig:
    """Two layers, GQA (4 query heads per KV head... 4/2), untied: fast and covers every code path."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=256)
