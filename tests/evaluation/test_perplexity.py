"""Held-out perplexity against a hand computation that reads the shards itself."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from helpers.training import TRAIN_VOCAB
from herd.evaluation.perplexity import ALL_SOURCES, source_perplexities
from herd.model import ModelConfig, Transformer


def stored_val_rows(prepared, source):
    """(tokens, document_ids) of every stored val row of ``source``, read with tarfile and numpy only."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    for shard in manifest["sources"][source]["splits"]["val"]["shards"]:
        members: dict[str, dict[str, np.ndarray]] = {}
        with tarfile.open(prepared / shard["path"]) as tar:
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                members.setdefault(key, {})[name] = np.load(io.BytesIO(tar.extractfile(member).read()))
        for key in sorted(members):
            yield members[key]["tokens.npy"].astype(np.int64), members[key]["document_ids.npy"].astype(np.int64)


def hand_nll(model, prepared, source):
    """Summed next-token NLL (float64) and the number of predicted tokens: a position predicts the next
    token when both belong to the same document and it is not padding (document id -1)."""
    rows = list(stored_val_rows(prepared, source))
    total, count = 0.0, 0
    for start in range(0, len(rows), 256):
        tokens = np.stack([t for t, _ in rows[start : start + 256]])  # (rows, row_len)
        documents = np.stack([d for _, d in rows[start : start + 256]])
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens[:, :-1]), document_ids=torch.from_numpy(documents[:, :-1]))
        logprobs = torch.log_softmax(logits.double(), dim=-1).numpy()  # (rows, seq, vocab)
        predicted = (documents[:, 1:] == documents[:, :-1]) & (documents[:, 1:] >= 0)
        row, position = np.nonzero(predicted)
        total -= float(logprobs[row, position, tokens[row, position + 1]].sum())
        count += int(predicted.sum())
    return total, count


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(3)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=TRAIN_VOCAB, multiple_of=16)).eval()


def test_perplexity_is_exp_of_the_mean_token_nll_computed_by_hand(prepared_corpus, random_model):
    found = source_perplexities(random_model, str(prepared_corpus), seq_len=64, batch_size=64)
    assert set(found) == {"prose", "code", ALL_SOURCES}
    pooled_total, pooled_count = 0.0, 0
    for source in ("prose", "code"):
        total, count = hand_nll(random_model, prepared_corpus, source)
        pooled_total, pooled_count = pooled_total + total, pooled_count + count
        assert count > 100 and found[source].tokens == count
        assert found[source].loss == pytest.approx(total / count, rel=1e-5)
        assert found[source].perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert found[ALL_SOURCES].tokens == pooled_count
    assert found[ALL_SOURCES].loss == pytest.approx(pooled_total / pooled_count, rel=1e-5)
    # an untrained model is close to the uniform guess
    assert found[ALL_SOURCES].loss == pytest.approx(math.log(TRAIN_VOCAB), abs=0.5)


def test_batch_size_does_not_change_the_result(prepared_corpus, random_model):
    one = source_perplexities(random_model, str(prepared_corpus), sources=["prose"], seq_len=64, batch_size=7)
    many = source_perplexities(random_model, str(prepared_corpus), sources=["prose"], seq_len=64, batch_size=16)
    assert one["prose"].tokens == many["prose"].tokens
    assert one["prose"].loss == pytest.approx(many["prose"].loss, rel=1e-5)


def test_an_unknown_source_is_refused_naming_the_sources(prepared_corpus, random_model):
    with pytest.raises(ValueError, match=r"\['web'\] are not sources .*\['code', 'prose'\]|\['prose', 'code'\]"):
        source_perplexities(random_model, str(prepared_corpus), sources=["web"])
