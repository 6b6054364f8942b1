"""SFT is the pretraining loss on assistant-only targets of packed dialogs: checked against dialogs alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from herd.data.chat import encode_dialog
from herd.data.packing import IGNORE_INDEX, next_token_targets
from herd.data.tokenizer import train_tokenizer
from herd.model import ModelConfig, Transformer
from herd.model.loss import next_token_loss
from herd.stages.sft import SFTStage

DIALOGS = [
    [{"role": "user", "content": "What does dedent do?"},
     {"role": "assistant", "content": "dedent(text): Remove any common leading whitespace."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Signature of json.dumps?"},
     {"role": "assistant", "content": "json.dumps(obj, *, skipkeys=False)"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! Ask me about the stdlib."},
     {"role": "user", "content": "What is heapq for?"}, {"role": "assistant", "content": "Heap queue algorithm."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for d in DIALOGS for m in d] * 20 + ["system user assistant"] * 20
    return train_tokenizer(texts, vocab_size=600)


def as_batch(encoded_dialogs):
    """One packed row of the dialogs, through the data pipeline's target rule: the next token where it is
    the assistant's and in the same dialog. A padding token closes the row."""
    ids = np.concatenate([*(np.asarray(e.ids) for e in encoded_dialogs), [0]])
    mask = np.concatenate([*(np.asarray(e.role_mask) for e in encoded_dialogs), [False]])
    docs = np.concatenate([*(np.full(len(e.ids), i) for i, e in enumerate(encoded_dialogs)), [-1]])
    targets = next_token_targets(ids, docs, docs < 0, mask)
    return {"tokens": torch.tensor(ids[:-1])[None], "document_ids": torch.tensor(docs[:-1])[None],
            "targets": torch.tensor(targets, dtype=torch.long)[None]}


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600, multiple_of=16,
                                   max_seq_len=256))


def test_a_packed_row_of_three_dialogs_has_the_token_weighted_loss_of_the_three_alone(tokenizer, model):
    encoded = [encode_dialog(tokenizer, d) for d in DIALOGS]
    packed, _ = next_token_loss(model, as_batch(encoded))
    alone = [next_token_loss(model, as_batch([e])) for e in encoded]
    expected = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    assert packed.item() == pytest.approx(expected.item(), abs=1e-5)
    # and the targets are exactly the assistant's tokens: content and eot, never a header or a prompt
    targets = as_batch(encoded)["targets"][0]
    trained = targets[targets != IGNORE_INDEX].tolist()
    assistant = [t for e in encoded for t, m in zip(e.ids, e.role_mask, strict=True) if m]
    assert trained == assistant


def test_prompt_tokens_and_other_dialogs_carry_exactly_zero_gradient(tokenizer, model):
    encoded = [encode_dialog(tokenizer, d) for d in DIALOGS]
    batch = as_batch(encoded)
    first = batch["targets"].clone()
    first[batch["document_ids"] != 0] = IGNORE_INDEX  # train on the first dialog's answer only
    captured = {}
    handles = [model.tok_embeddings.register_forward_hook(lambda m, i, out: captured.setdefault("emb", out).retain_grad()),
               model.norm.register_forward_hook(lambda m, i, out: captured.setdefault("hidden", out).retain_grad())]
    try:
        loss, _ = next_token_loss(model, {**batch, "targets": first})
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad()
    hidden_grad = captured["hidden"].grad[0]  # (seq, dim): the output layer's input
    no_target = first[0] == IGNORE_INDEX
    assert torch.count_nonzero(hidden_grad[no_target]) == 0  # prompts, headers: not a single non-zero
    assert torch.count_nonzero(hidden_grad[~no_target]) > 0
    embedding_grad = captured["emb"].grad[0]  # (seq, dim)
    others = batch["document_ids"][0] != 0
    assert torch.count_nonzero(embedding_grad[others]) == 0  # the other dialogs in the row: exactly zero
    assert torch.count_nonzero(embedding_grad[~others]) > 0


def test_sft_needs_a_model_directory():
    with pytest.raises(ValueError, match="stage.init_from"):
        SFTStage(model=ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=600))
