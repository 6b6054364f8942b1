"""Reading inputs as documents: text files, folders and jsonl, checked to be text."""

from __future__ import annotations

import pytest

from herd.data.inputs import BAD_INPUT_REASONS, BadInputError, binary_reason
from herd.data.kinds.text import iter_documents


def test_text_folders_and_jsonl(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("bee")
    (tmp_path / "docs" / "sub" / "a.txt").write_text("ay")
    (tmp_path / "docs" / ".hidden.txt").write_text("secret")
    (tmp_path / "docs" / "more.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    docs = list(iter_documents([str(tmp_path / "docs")], text_field="body"))
    assert [(d.id, d.text) for d in docs] == [
        ("b.txt", "bee"),
        ("more.jsonl:1", "one"),
        ("more.jsonl:3", "two"),
        ("sub/a.txt", "ay"),
    ]
    single = list(iter_documents(str(tmp_path / "docs" / "b.txt")))
    assert [(d.id, d.text) for d in single] == [("b.txt", "bee")]


def test_a_jsonl_lines_own_id_names_the_document_and_decides_its_split(tmp_path):
    from herd.data.kinds import assign_split

    lines = ['{"text": "a", "id": "os/path.py"}', '{"text": "b", "id": 7}', '{"text": "c", "id": ""}',
             '{"text": "d", "id": true}', '{"text": "e"}']
    (tmp_path / "curated.jsonl").write_text("\n".join(lines) + "\n")
    bad = []
    docs = list(iter_documents(str(tmp_path / "curated.jsonl"), on_bad_input=bad.append))
    assert [d.id for d in docs] == ["os/path.py", "7", "curated.jsonl:5"]
    # any other id is a bad line, named
    assert [(e.reason, e.location) for e in bad] == [("not_a_string", f"{tmp_path / 'curated.jsonl'}:{n}") for n in (3, 4)]
    assert "field 'id' must be a non-empty string or an integer, got ''" in str(bad[0])
    # the split of a curated document is the split its input had under the same id
    ids = [f"module{i}.py" for i in range(400)]
    (tmp_path / "many.jsonl").write_text("".join(f'{{"text": "x", "id": "{i}"}}\n' for i in ids))
    held_out = {d.id for d in iter_documents(str(tmp_path / "many.jsonl")) if assign_split(d.id, 0.1) == "val"}
    assert held_out == {i for i in ids if assign_split(i, 0.1) == "val"} and 10 < len(held_out) < 80


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', "malformed JSON"),
        ('["text"]', "expected a JSON object"),
        ('{"body": "x"}', "no 'text' field \\(fields: \\['body'\\]\\)"),
        ('{"text": 7}', "field 'text' must be a string"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: {message}"):
        list(iter_documents(str(path)))


def test_missing_inputs_name_themselves(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.jsonl")):
        list(iter_documents(str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(iter_documents(str(tmp_path / "empty")))


def test_binary_files_are_refused_with_the_fix(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="blob.bin is not UTF-8 text.*glob"):
        list(iter_documents(str(tmp_path / "blob.bin")))


def test_text_with_nul_or_many_control_characters_is_binary():
    assert binary_reason("plain text\twith\ttabs\r\n\f\vand page breaks\n") is None
    assert binary_reason("") is None
    assert binary_reason("x" * 1000 + "\0") == "it holds NUL characters"
    assert binary_reason("x" * 95 + "\x1b" * 5) is None  # 5%: still text (terminal colours, say)
    assert binary_reason("x" * 94 + "\x1b" * 6) == "6% of its characters are control characters"
    assert binary_reason("\x85" * 10) is not None  # C1 controls count too


def test_bad_inputs_are_reported_and_skipped_when_the_handler_returns(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("fine")
    (tmp_path / "docs" / "b.dat").write_bytes(b"\0" * 100)
    (tmp_path / "docs" / "c.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "docs" / "d.jsonl").write_bytes(
        b'{"text": "one"}\n{"text": "\xff"}\n{"text": "a\\u0000b"}\n{"text": oops}\n{"text": "five"}\n'
    )
    with pytest.raises(BadInputError, match=f"{tmp_path / 'docs' / 'b.dat'}: the file is not text") as caught:
        list(iter_documents(str(tmp_path / "docs")))
    assert (caught.value.reason, caught.value.location) == ("binary", str(tmp_path / "docs" / "b.dat"))
    reported = []
    docs = list(iter_documents(str(tmp_path / "docs"), on_bad_input=reported.append))
    assert [(d.id, d.text) for d in docs] == [("a.txt", "fine"), ("d.jsonl:1", "one"), ("d.jsonl:5", "five")]
    jsonl = tmp_path / "docs" / "d.jsonl"
    assert [(e.reason, e.location) for e in reported] == [
        ("binary", str(tmp_path / "docs" / "b.dat")),
        ("not_utf8", str(tmp_path / "docs" / "c.txt")),
        ("not_utf8", f"{jsonl}:2"),
        ("binary", f"{jsonl}:3"),
        ("malformed_json", f"{jsonl}:4"),
    ]
    assert "not UTF-8 text (invalid byte at column 11)" in str(reported[2])
    assert {e.reason for e in reported} <= set(BAD_INPUT_REASONS)




def test_a_line_longer_than_max_line_bytes_is_skipped_unread_and_counted(tmp_path):
    from herd.data.inputs import jsonl_records, line_limit

    path = tmp_path / "d.jsonl"
    at_limit = '{"text": "' + "x" * 88 + '"}'  # 100 bytes: kept
    path.write_bytes(f'{at_limit}\n{{"text": "{"y" * 5000}"}}\r\n{{"text": "after"}}\n'.encode() + b'{"text": "' + b"z" * 300)
    reported: list[BadInputError] = []
    with line_limit(100):
        records = list(jsonl_records(path, reported.append))
    assert [(n, r["text"][:5]) for n, r in records] == [(1, "xxxxx"), (3, "after")]
    assert [(e.reason, e.location) for e in reported] == [("too_long_line", f"{path}:2"), ("too_long_line", f"{path}:4")]
    assert "the line is 5,013 bytes, more than max_line_bytes=100" in str(reported[0])  # its \r counts, not its \n
    assert "the line is 310 bytes" in str(reported[1])  # the last line has no newline
    assert len(list(jsonl_records(path, reported.append))) == 3  # outside the block: MAX_LINE_BYTES (8 MiB)
    assert {e.reason for e in reported} <= set(BAD_INPUT_REASONS)
    with pytest.raises(ValueError, match="max_line_bytes must be a positive number of bytes, got 0"), line_limit(0):
        pass
