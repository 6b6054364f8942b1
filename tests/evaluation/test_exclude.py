"""The exclusion list of herd.evaluate: contaminated.jsonl read by id; a bad file is one line naming it and the fix."""

from __future__ import annotations

import json

import pytest

from herd.evaluation.exclude import load_excluded


def test_listed_ids_are_left_out_in_order(tmp_path):
    path = tmp_path / "contaminated.jsonl"
    path.write_text(json.dumps({"set": "quiz", "id": "b", "coverage": 1.0, "seen_in": "web/4"}) + "\n\n"
                    + json.dumps({"set": "sft", "id": "items.jsonl:3"}) + "\n")
    excluded = load_excluded(path)
    assert excluded.ids == {"b", "items.jsonl:3"}
    kept, dropped = excluded.split(["a", "b", "c", "items.jsonl:3", "d"], lambda item: item)
    assert kept == ["a", "c", "d"] and dropped == ["b", "items.jsonl:3"]


def test_an_empty_list_excludes_nothing(tmp_path):
    (tmp_path / "contaminated.jsonl").write_text("")   # what decontaminate writes when nothing is contaminated
    assert load_excluded(tmp_path / "contaminated.jsonl").split([1, 2], str) == ([1, 2], [])


@pytest.mark.parametrize(("content", "problem"), [
    (None, "contaminated.jsonl: no such file"),
    ('{"id": "a"}\nnot json\n', "contaminated.jsonl:2: not JSON"),
    ('{"set": "quiz"}\n', "contaminated.jsonl:1: expected an object with a string 'id'"),
    ('["a"]\n', "contaminated.jsonl:1: expected an object with a string 'id'"),
    (b"\xff\xfe", "contaminated.jsonl: not UTF-8"),
])
def test_a_missing_or_malformed_list_is_one_line_naming_the_file_and_the_fix(tmp_path, content, problem):
    path = tmp_path / "contaminated.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        load_excluded(path)
    message = str(error.value)
    assert message.startswith(f"exclude={tmp_path}/") and problem in message and "\n" not in message
    assert message.endswith("give the contaminated.jsonl that herd.curate's decontaminate block wrote, or "
                            "exclude=null")
