"""The pretraining loss: against the formula, chunked == full, activation checkpointing == plain."""

from __future__ import annotations

import copy

import pytest
import torch

from herd.model import ModelConfig, Transformer
from herd.stages.parallelize import apply_activation_checkpointing
from herd.stages.pretrain import IGNORE_INDEX, next_token_loss


@pytest.fixture
def batch():
    tokens = torch.randint(0, 97, (2, 40))
    document_ids = torch.cat([torch.zeros(2, 25, dtype=torch.long), torch.ones(2, 15, dtype=torch.long)], dim=1)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, 24] = IGNORE_INDEX  # the last token of a document predicts nothing
    targets[:, -1] = IGNORE_INDEX
    return {"tokens": tokens, "document_ids": document_ids, "targets": targets}


def grads(model):
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


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


@pytest.mark.parametrize("setting", ["full", 2])
def test_activation_checkpointing_gives_the_same_gradients(small_config, batch, setting):
    plain = Transformer(small_config)
    checkpointed = copy.deepcopy(plain)
    wrapped = apply_activation_checkpointing(checkpointed, setting)
    assert wrapped == (2 if setting == "full" else 1)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    for model in (plain, checkpointed):
        next_token_loss(model, batch)[0].backward()
    for name, grad in grads(plain).items():
        assert torch.allclose(grads(checkpointed)[name], grad, atol=1e-6), name


def test_bad_activation_checkpointing_setting_is_named():
    from herd.stages.parallelize import checkpoint_every

    with pytest.raises(ValueError, match="stage.activation_checkpointing='sometimes'"):
        checkpoint_every("sometimes")


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_evaluation_scores_match_the_loss_and_a_hand_counted_accuracy(small_config, batch, chunk_size):
    from herd.stages.pretrain import next_token_scores

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
