"""Document sources: the embedded stdlib corpus, text files, folders and jsonl."""

from __future__ import annotations

import numpy as np
import pytest

from herd.data.embedded.corpus import module_docstrings, stdlib_code, stdlib_dir, stdlib_files, stdlib_prose
from herd.data.embedded.passkey import passkey_options, stdlib_passkey
from herd.data.inputs import BAD_INPUT_REASONS, BadInputError, binary_reason, iter_documents
from herd.evaluation.needle import NEEDLE, QUESTION

MODULE = '''"""Tools for widgets."""
import os


class Widget(Base):
    """A widget."""

    def spin(self, times=1):
        """Spin ``times`` times."""

    def _hidden(self):
        pass


if os.name == "posix":
    async def fetch(url, *, timeout=None):
        """Fetch a URL."""
'''


def _fake_stdlib(root):
    files = {
        "zeta.py": MODULE,
        "alpha/__init__.py": '"""Alpha package."""',
        "alpha/beta.py": "x = 1\n",
        "test/test_zeta.py": '"""a test."""',
        "lib2to3/tests/data.py": '"""a test fixture."""',
        "idlelib/idle_test/test_x.py": '"""a test."""',
        "site-packages/pkg.py": '"""installed."""',
        "notes.txt": "not python",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_stdlib_files_skip_tests_site_packages_and_outside_links(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    outside = tmp_path / "outside.py"
    outside.write_text('"""elsewhere."""')
    (root / "link.py").symlink_to(outside)
    names = [p.relative_to(root).as_posix() for p in stdlib_files(root)]
    assert names == ["alpha/__init__.py", "alpha/beta.py", "zeta.py"]


def test_prose_is_docstrings_with_qualified_headers(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    docs = {d.id: d.text for d in stdlib_prose(root)}
    assert docs["alpha/__init__.py"] == "Module alpha\n\nAlpha package."
    assert docs["alpha/beta.py"] == ""  # no docstring: an empty document, skipped and counted by prepare
    assert docs["zeta.py"] == (
        "Module zeta\n\nTools for widgets.\n\n\n"
        "class zeta.Widget(Base)\n\nA widget.\n\n\n"
        "def zeta.Widget.spin(self, times=1)\n\nSpin ``times`` times.\n\n\n"
        "async def zeta.fetch(url, *, timeout=None)\n\nFetch a URL."
    )


def test_code_is_the_source_text_in_sorted_order(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    docs = list(stdlib_code(root))
    assert [d.id for d in docs] == ["alpha/__init__.py", "alpha/beta.py", "zeta.py"]
    assert docs[2].text == MODULE


def test_unparseable_module_gives_empty_prose():
    assert module_docstrings("def broken(:\n", "broken") == ""


def test_real_stdlib_corpus_is_deterministic_and_has_no_tests():
    files = stdlib_files()
    assert files == stdlib_files()
    relative = [p.relative_to(stdlib_dir()).as_posix() for p in files]
    assert relative == sorted(relative)
    assert "json/decoder.py" in relative
    assert not [
        r for r in relative if r.startswith(("test/", "site-packages/")) or "/tests/" in r or "idle_test" in r
    ]
    json_prose = next(d for d in stdlib_prose() if d.id == "json/__init__.py")
    assert json_prose.text.startswith("Module json\n\nJSON (JavaScript Object Notation)")
    assert "def json.dumps(obj, *" in json_prose.text


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
