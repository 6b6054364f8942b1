"""Fixtures for the data tests (helpers live in helpers/synthetic.py)."""

from __future__ import annotations

import pytest

from helpers.synthetic import tiny_corpus
from herd.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE of 640 ids (384 BPE + 256 special), trained in well under a second."""
    return train_tokenizer(tiny_corpus(200), vocab_size=640)
