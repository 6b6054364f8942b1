"""Token F1 against a hand count; held-out questions come only from modules the split holds out."""

from __future__ import annotations

import json

import pytest

from herd.data.kinds import assign_split
from herd.evaluation.answers import held_out_dialogs, token_f1


def test_token_f1_matches_a_hand_count():
    # prediction words: json dumps obj serialize obj ; reference: json dumps obj skipkeys false
    # overlap (multiset): json, dumps, obj -> 3; precision 3/5, recall 3/5 -> F1 0.6
    assert token_f1("json.dumps(obj): Serialize obj", "json.dumps(obj, skipkeys=False)") == pytest.approx(0.6)
    assert token_f1("Same words", "same WORDS") == 1.0
    assert token_f1("nothing shared", "json dumps") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_stdlib_questions_come_from_held_out_modules_only():
    from herd.data.embedded.sft import stdlib_sft

    held = held_out_dialogs("stdlib:sft", count=40, val_fraction=0.02)
    assert len(held) == 40
    groups = {d.messages[-2]["content"]: d.group for d in stdlib_sft()}
    for item in held:
        assert item.prompt[-1]["role"] == "user" and item.reference
        assert assign_split(groups[item.prompt[-1]["content"]], 0.02) == "val"


def test_held_out_dialogs_from_a_jsonl_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    held = held_out_dialogs(str(path), count=2)
    assert [(h.prompt[-1]["content"], h.reference) for h in held] == [("q0", "a0"), ("q1", "a1")]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match=r"eval.jsonl:1: the last message must be the assistant"):
        held_out_dialogs(str(path))
