"""Activation checkpointing around the pretraining loss: the same gradients as the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.training import two_document_batch
from herd.model import Transformer
from herd.model.loss import next_token_loss
from herd.stages.parallelize import apply_activation_checkpointing


@pytest.fixture
def batch():
    return two_document_batch()


def grads(model):
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


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
