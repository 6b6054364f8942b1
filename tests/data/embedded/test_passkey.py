"""stdlib:passkey: retrieval documents with a hidden key, in the needle evaluation's words."""

from __future__ import annotations

import numpy as np
import pytest

from herd.data.embedded.passkey import NEEDLE, QUESTION, passkey_options, stdlib_passkey
from herd.data.kinds.text import iter_documents


def test_passkey_documents_hide_a_key_and_ask_for_it():
    docs = list(stdlib_passkey(documents=4000))
    assert len({d.id for d in docs}) == len(docs) == 4000
    for doc in docs[:200]:
        head, _, key = doc.text.rpartition(QUESTION + " ")
        key = key.removesuffix(".")
        assert key.isdigit() and len(key) == 5
        assert head.count(NEEDLE.format(key=key).strip()) == 1  # hidden once, asked for at the end
    lengths = np.array([len(d.text) for d in docs])
    # density ~ 1/length^2: about the same number of characters in each doubling of length
    shares = [lengths[(lengths >= lo) & (lengths < 2 * lo)].sum() / lengths.sum() for lo in (400, 800, 1600, 3200)]
    assert min(shares) > 0.6 * max(shares)
    assert lengths.max() <= 7000 + 200 and list(stdlib_passkey(documents=10))[5] == docs[5]
    with pytest.raises(ValueError, match="chars="):
        next(stdlib_passkey(chars=(0, 10)))


def test_passkey_options_come_from_a_query_string():
    assert passkey_options("stdlib:passkey") == {"chars": (100, 7000)}
    assert passkey_options("stdlib:passkey?min_chars=2500&documents=40&seed=1") == {
        "documents": 40, "seed": 1, "chars": (2500, 7000)}
    docs = list(iter_documents("stdlib:passkey?min_chars=2500&max_chars=3000&documents=6"))
    assert len(docs) == 6
    for doc in docs:  # the haystack's length: the text before the question, less the needle and its space
        head, _, key = doc.text.rpartition(QUESTION + " ")
        assert 2500 <= len(head) - len(NEEDLE.format(key=key.removesuffix(".")).lstrip()) - 1 <= 3000
    with pytest.raises(ValueError, match="unknown option 'length'"):
        passkey_options("stdlib:passkey?length=5")
    with pytest.raises(ValueError, match="option documents='many' must be an integer"):
        passkey_options("stdlib:passkey?documents=many")
