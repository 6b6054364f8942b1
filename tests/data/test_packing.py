"""Packing documents into rows, and re-cutting rows into samples with document ids and targets."""

from __future__ import annotations

import numpy as np
import pytest

from herd.data.packing import IGNORE_INDEX, PAD_DOCUMENT_ID, Rechunker, pack_documents, with_boundaries

BOS, EOS, PAD = 1000, 1001, 1001


def _documents(seed=0, count=25):
    rng = np.random.default_rng(seed)
    docs, next_token = [], 0
    for _ in range(count):
        n = int(rng.integers(0, 30))
        docs.append(with_boundaries(np.arange(next_token, next_token + n), BOS, EOS))
        next_token += n
    return docs


def test_packing_keeps_every_token_once_with_matching_document_ids():
    docs = _documents()
    packed = pack_documents(docs, row_len=17, pad_id=PAD, document_ids=range(100, 125))
    tokens, ids = packed.tokens.reshape(-1), packed.document_ids.reshape(-1)
    real = ids != PAD_DOCUMENT_ID
    np.testing.assert_array_equal(tokens[real], np.concatenate(docs))
    expected_ids = np.concatenate([np.full(len(d), 100 + i) for i, d in enumerate(docs)])
    np.testing.assert_array_equal(ids[real], expected_ids)
    # every document starts at a bos and ends at an eos, and the id changes exactly there
    starts = np.flatnonzero(np.diff(ids[real], prepend=-2) != 0)
    assert (tokens[real][starts] == BOS).all()
    assert packed.tokens.shape[1] == 17
    assert real[: -packed.tokens.shape[1]].all()  # only the last row is padded
    assert (tokens[~real] == PAD).all()


def test_packing_an_exact_multiple_needs_no_padding():
    docs = [with_boundaries(np.arange(15), BOS, EOS)] * 2  # 2 x 17 tokens
    packed = pack_documents(docs, row_len=17, pad_id=PAD)
    assert packed.tokens.shape == (2, 17)
    assert (packed.document_ids[1] == 1).all()


def _rows(packed):
    return [(packed.tokens[i], packed.document_ids[i], i) for i in range(len(packed.tokens))]


def test_rechunker_returns_stored_rows_unchanged_at_the_stored_length():
    packed = pack_documents(_documents(), row_len=17, pad_id=PAD)
    chunker = Rechunker(seq_len=16)
    samples = [s for row in _rows(packed) for s in chunker.add(*row)]
    assert len(samples) == len(packed.tokens)
    for sample, row in zip(samples, packed.tokens, strict=True):
        np.testing.assert_array_equal(sample.tokens, row[:-1])


@pytest.mark.parametrize("seq_len", [5, 16, 40])
def test_rechunked_samples_cover_the_stream_with_correct_targets(seq_len):
    packed = pack_documents(_documents(1), row_len=17, pad_id=PAD)
    chunker = Rechunker(seq_len)
    samples = [s for row in _rows(packed) for s in chunker.add(*row)]
    flat_tokens, flat_ids = packed.tokens.reshape(-1), packed.document_ids.reshape(-1)
    for k, sample in enumerate(samples):
        window = slice(k * (seq_len + 1), (k + 1) * (seq_len + 1))
        tokens, ids = flat_tokens[window], flat_ids[window]
        np.testing.assert_array_equal(sample.tokens, tokens[:-1])
        # document ids: 0 for the first document, +1 at each change
        np.testing.assert_array_equal(sample.document_ids, np.cumsum(np.diff(ids[:-1], prepend=ids[0]) != 0))
        same = (ids[1:] == ids[:-1]) & (ids[1:] != PAD_DOCUMENT_ID)
        np.testing.assert_array_equal(
            sample.targets, np.where(same, tokens[1:].astype(np.int64), IGNORE_INDEX)
        )
    assert len(samples) == flat_tokens.size // (seq_len + 1)


def test_targets_never_cross_a_document_boundary():
    docs = [with_boundaries([5, 6], BOS, EOS), with_boundaries([7], BOS, EOS)]
    packed = pack_documents(docs, row_len=8, pad_id=PAD)
    (sample,) = Rechunker(7).add(packed.tokens[0], packed.document_ids[0], 0)
    assert sample.tokens.tolist() == [BOS, 5, 6, EOS, BOS, 7, EOS]
    assert sample.document_ids.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert sample.targets.tolist() == [5, 6, EOS, IGNORE_INDEX, 7, EOS, IGNORE_INDEX]


def test_rows_that_were_not_neighbours_never_share_a_document():
    tokens = np.arange(8, dtype=np.uint32)
    same_doc = np.zeros(8, dtype=np.int32)
    chunker = Rechunker(15)
    assert chunker.add(tokens, same_doc, row_index=4) == []
    (far,) = chunker.add(tokens + 8, same_doc, row_index=9)  # same document id, not row 5
    assert far.document_ids.tolist() == [0] * 8 + [1] * 7
    assert far.targets[7] == IGNORE_INDEX
    chunker = Rechunker(15)
    chunker.add(tokens, same_doc, row_index=4)
    (near,) = chunker.add(tokens + 8, same_doc, row_index=5)  # the next row: one document
    assert near.document_ids.tolist() == [0] * 15
    assert near.targets[7] == 8
