"""The next-token losses every stage shares: against the formula, chunked == full, evaluation scores, and
the one chunked log-prob (values and gradients equal whole logits'; no chunk of logits kept for backward)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from helpers.training import two_document_batch
from herd.constants import IGNORE_INDEX
from herd.model import ModelConfig, Transformer
from herd.model.loss import chunk_rows, next_token_loss, next_token_scores, target_logps


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


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_target_logps_and_their_gradients_equal_whole_logits(chunk_size):
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    upstream = torch.randn(50)  # a per-token weight, as DPO's sigmoid gives
    got = target_logps(hidden, weight, targets, chunk_size)
    (got * upstream).sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got_grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_grads[1], weight.grad, rtol=1e-5, atol=1e-5)


def test_the_backward_keeps_no_chunk_of_logits():
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps = target_logps(hidden, weight, torch.randint(0, 1000, (64,)), chunk_size=16)
    kept = sum(t.numel() for t in saved if t is not weight)
    assert kept < 16 * 1000  # hidden (64 x 16), targets and one logsumexp per row: no (chunk, vocab) logits
    logps.sum().backward()
    assert weight.grad.shape == weight.shape


def test_under_bf16_autocast_the_matmul_is_bf16_and_the_softmax_float32():
    hidden, weight = torch.randn(30, 32), torch.randn(97, 32)
    targets = torch.randint(0, 97, (30,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target_logps(hidden, weight, targets, chunk_size=8)
        logits = torch.nn.functional.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    expected = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_without_a_chunk_size_a_chunk_holds_128_mib_of_float32_logits():
    assert chunk_rows(8192) == 4096 and chunk_rows(128256) == 261 and chunk_rows(97, 5) == 5
    with pytest.raises(ValueError, match="positive"):
        chunk_rows(97, 0)


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
