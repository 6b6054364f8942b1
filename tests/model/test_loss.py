"""The next-token losses every stage shares: against the formula, chunked == full, evaluation scores."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from helpers.training import two_document_batch
from herd.constants import IGNORE_INDEX
from herd.model import ModelConfig, Transformer
from herd.model.loss import next_token_loss, next_token_scores


@pytest.fixture
def batch():
    return two_document_batch()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_loss_is_the_mean_negative_log_likelihood_of_the_targets(small_config, batch):
    model = Transformer(small_config)
    loss, n_tokens = next_token_loss(model, batch)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(batch["tokens"], document_ids=batch["document_ids"]), dim=-1)
    keep = batch["targets"] != IGNORE_INDEX
    picked = log_probs[keep].gather(-1, batch["targets"][keep][:, None])
    assert n_tokens == keep.sum() == 2 * 38
    assert loss.item() == pytest.approx(-picked.mean().item(), rel=1e-6)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 32, 1000])
def test_chunked_loss_equals_full_loss_and_gradients(small_config, batch, chunk_size, tied):
    config = ModelConfig(**{**small_config.to_dict(), "tie_embeddings": tied})
    full_model = Transformer(config)
    chunked_model = copy.deepcopy(full_model)
    full, _ = next_token_loss(full_model, batch)
    chunked, _ = next_token_loss(chunked_model, batch, chunk_size=chunk_size)
    full.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), abs=1e-5)
    for name, grad in grads(full_model).items():
        assert torch.allclose(grads(chunked_model)[name], grad, atol=1e-5), name


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_evaluation_scores_match_the_loss_and_a_hand_counted_accuracy(small_config, batch, chunk_size):
    model = Transformer(small_config)
    with torch.no_grad():
        predicted = model(batch["tokens"], document_ids=batch["document_ids"]).argmax(-1)
    real = batch["targets"] != IGNORE_INDEX
    batch["targets"][:, ::3] = torch.where(real[:, ::3], predicted[:, ::3], IGNORE_INDEX)  # some hits for sure
    total, n_tokens, correct = next_token_scores(model, batch, chunk_size)
    loss, expected_tokens = next_token_loss(model, batch)
    assert n_tokens == expected_tokens and (total / n_tokens).item() == pytest.approx(loss.item(), rel=1e-5)
    hits = sum(int(predicted[b, t] == batch["targets"][b, t]) for b in range(2) for t in range(40)
               if batch["targets"][b, t] != IGNORE_INDEX)
    assert correct.item() == hits >= 20


def test_ignore_index_is_defined_once_below_every_layer():
    """herd.constants holds the one IGNORE_INDEX; every other module imports it."""
    src = Path(__file__).resolve().parents[2] / "src" / "herd"
    defining = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "IGNORE_INDEX" for t in targets):
                defining.append(str(path.relative_to(src)))
    assert defining == ["constants.py"]
    assert IGNORE_INDEX == -100 == torch.nn.CrossEntropyLoss().ignore_index
