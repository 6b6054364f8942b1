"""Needle-in-a-haystack scoring: an oracle scores 1.0, a random model about 0."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from herd.data.tokenizer import train_tokenizer
from herd.evaluation.needle import NeedleResult, collect_haystack, needle_accuracy
from herd.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tokenizer():
    text = [f"The pass key is {i}. Remember it. What is the pass key? {i * 7} words and numbers." for i in range(300)]
    return train_tokenizer(text, vocab_size=600)


class Oracle(torch.nn.Module):
    """Test-only stub that is told the answer: it reads the key out of the needle in its input and puts
    all its probability on the key's tokens at the answer positions (shifted by ``offset``)."""

    def __init__(self, tokenizer, offset: int = 0):
        super().__init__()
        self.tokenizer, self.offset = tokenizer, offset
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs):
        logits = torch.zeros(*inputs.shape, self.tokenizer.vocab_size)
        for row, ids in enumerate(inputs.tolist()):
            key = re.search(r"The pass key is (\d+)", self.tokenizer.decode(ids)).group(1)
            answer = self.tokenizer.encode(f" {key}")
            # logits at position p predict token p + 1: the answer's first token follows the question.
            first = inputs.shape[1] - len(answer) + self.offset
            for k, token in enumerate(answer):
                logits[row, first + k, token] = 1.0
        return logits


def test_an_oracle_scores_one_and_a_random_model_about_zero(tokenizer):
    haystack = list(np.random.default_rng(0).integers(0, 256, 5000))
    result = needle_accuracy(Oracle(tokenizer), tokenizer, haystack, lengths=[96, 160], depths=[0.0, 0.5, 1.0],
                             trials=3)
    assert result.accuracy.shape == (3, 2)
    assert result.mean == 1.0
    random_model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tokenizer.vocab_size))
    result = needle_accuracy(random_model, tokenizer, haystack, lengths=[96, 160], depths=[0.0, 0.5, 1.0], trials=3)
    assert result.mean <= 0.1


def test_an_oracle_one_position_off_scores_zero(tokenizer):
    haystack = list(np.random.default_rng(1).integers(0, 256, 5000))
    result = needle_accuracy(Oracle(tokenizer, offset=-1), tokenizer, haystack, lengths=[96], depths=[0.5], trials=4)
    assert result.mean == 0.0


def test_heatmap_image_and_table():
    result = NeedleResult([256, 512], [0.0, 1.0], np.array([[1.0, 0.0], [0.5, 1.0]]))
    image = result.image(cell=4)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert image[0, 0, 1] > image[0, 0, 0] and image[0, 4, 0] > image[0, 4, 1]  # green = solved, red = missed
    assert result.at_length(512) == 0.5 and "256" in result.table()


def test_haystack_drops_special_tokens_and_needs_enough_text():
    batches = [{"tokens": torch.tensor([[1, 5, 6, 2, 7]])}] * 3
    assert collect_haystack(batches, 6, drop_ids=[1, 2]) == [5, 6, 7, 5, 6, 7]
    with pytest.raises(ValueError, match="only 9 tokens"):
        collect_haystack(batches, 100, drop_ids=[1, 2])


def test_haystack_skips_rows_that_hold_the_needle_words():
    batches = [{"tokens": torch.tensor([[5, 6, 7, 8], [9, 40, 41, 9], [10, 11, 12, 13]])}]
    assert collect_haystack(batches, 8, drop_ids=[], skip_rows_with=[40, 41]) == [5, 6, 7, 8, 10, 11, 12, 13]
