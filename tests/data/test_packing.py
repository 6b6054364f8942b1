"""Packing documents into rows, and re-cutting rows into samples with document ids and targets."""

from __future__ import annotations

import numpy as np
import pytest

from herd.data.packing import (
    IGNORE_INDEX,
    PAD_DOCUMENT_ID,
    Rechunker,
    WholePacker,
    pack_documents,
    pack_range,
    with_boundaries,
)

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


# --- whole examples with a loss mask (dialogs) -----------------------------------------------------


def test_loss_mask_limits_targets_to_masked_next_tokens():
    tokens = np.array([BOS, 5, 6, 7, EOS, BOS, 8, 9, PAD, PAD], dtype=np.uint32)
    docs = np.array([3, 3, 3, 3, 3, 4, 4, 4, -1, -1], dtype=np.int32)
    mask = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0, 0], dtype=bool)  # "7 EOS" and "8 9" are trained
    (sample,) = Rechunker(9).add(tokens, docs, 0, mask)
    assert sample.targets.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, EOS, IGNORE_INDEX, 8, 9, IGNORE_INDEX,
                                       IGNORE_INDEX]  # fmt: skip
    assert sample.document_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2]
    (unmasked,) = Rechunker(9).add(tokens, docs, 0)  # the same row as text: every next token
    assert unmasked.targets.tolist() == [5, 6, 7, EOS, IGNORE_INDEX, 8, 9, IGNORE_INDEX, IGNORE_INDEX]


def test_rows_with_and_without_a_mask_do_not_mix():
    chunker = Rechunker(15)
    chunker.add(np.arange(8, dtype=np.uint32), np.zeros(8, np.int32), 0, np.ones(8, bool))
    with pytest.raises(ValueError, match="cannot be mixed"):
        chunker.add(np.arange(8, dtype=np.uint32), np.zeros(8, np.int32), 1)


@pytest.mark.parametrize("open_rows", [1, 4, 16])
def test_whole_packer_places_every_example_once_whole_and_deterministically(open_rows):
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(1, 18, size=300)] + [17]

    def pack():
        packer = WholePacker(17, open_rows)
        rows = [row for index, n in enumerate(lengths) for row in packer.add(index, n)]
        return rows + packer.finish()

    rows = pack()
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each exactly once
    assert all(sum(lengths[i] for i in row) <= 17 for row in rows)  # whole, never over a row
    assert pack() == rows
    # first-fit within the open rows beats one-row greedy (open_rows=1) on padding
    greedy = WholePacker(17, 1)
    greedy_rows = [row for index, n in enumerate(lengths) for row in greedy.add(index, n)] + greedy.finish()
    assert len(rows) <= len(greedy_rows)


def test_whole_packer_first_fit_by_hand():
    packer = WholePacker(10, open_rows=2)
    assert packer.add("a", 6) == []
    assert packer.add("b", 6) == []  # does not fit next to a: a second row
    assert packer.add("c", 4) == [["a", "c"]]  # fills a's row, which closes
    assert packer.add("d", 7) == []
    assert packer.add("e", 5) == [["b"]]  # a third open row closes the oldest
    assert packer.add("f", 10) == [["f"]]  # a full row closes at once
    assert packer.finish() == [["d"], ["e"]]
    with pytest.raises(ValueError, match="does not fit a row of 10"):
        packer.add("g", 11)


# --- extras (preference rows) --------------------------------------------------------------------


def test_extras_are_cut_like_tokens_and_padded_with_their_pad_value():
    flat = np.arange(1, 15, dtype=np.uint32)
    extras = {"response_ids": np.arange(14) % 4, "ranks": np.arange(14) % 3 - 1}
    packed = pack_range(flat, np.array([14]), np.array([0]), row_len=8, pad_id=0, first_row=0, end_row=2,
                        extras=extras)  # fmt: skip
    assert packed.extras["response_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 0, 0]]
    assert packed.extras["ranks"].tolist() == [[-1, 0, 1, -1, 0, 1, -1, 0], [1, -1, 0, 1, -1, 0, -1, -1]]
    assert {name: values.dtype for name, values in packed.extras.items()} == {
        "response_ids": np.int16, "ranks": np.int16,
    }  # fmt: skip
    (sample,) = Rechunker(7).add(packed.tokens[0], packed.document_ids[0], 0, None, {
        name: values[0] for name, values in packed.extras.items()
    })  # fmt: skip
    assert sample.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7]  # the inputs: row[:-1] ...
    assert sample.extras["response_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2]  # ... and their extras
    assert sample.extras["ranks"].dtype == np.int32
    assert Rechunker(7).add(packed.tokens[0], packed.document_ids[0], 0)[0].extras == {}


def test_extras_are_cut_across_rows_when_rows_are_re_cut():
    tokens = np.arange(10, dtype=np.uint32)
    chunker = Rechunker(5)
    assert chunker.add(tokens[:4], np.zeros(4, np.int32), 0, extras={"ranks": np.arange(4)}) == []
    (sample,) = chunker.add(tokens[4:], np.zeros(6, np.int32), 1, extras={"ranks": np.arange(4, 10)})
    assert sample.extras["ranks"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"rows with the extras \['ranks'\] and \[\] cannot be mixed"):
        chunker.add(tokens, np.zeros(10, np.int32), 2)


def test_packing_and_its_ignore_index_import_without_torch():
    """The prepare side's light users read herd.data.packing (and IGNORE_INDEX) without paying for torch."""
    import subprocess
    import sys

    code = ("import sys; from herd.data.packing import IGNORE_INDEX; from herd.data import IGNORE_INDEX as again; "
            "print(IGNORE_INDEX, again, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["-100", "-100", "False"]
