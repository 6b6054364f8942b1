"""The embedded SFT set: questions about stdlib definitions answered by signature and docstring."""

from __future__ import annotations

import ast
import inspect
import json
import json.decoder
import textwrap

import pytest

from herd.data.chat import render_dialog
from herd.data.embedded.sft import (
    ANSWERS,
    MAX_ANSWER_CHARS,
    MAX_SUMMARY_CHARS,
    QUESTIONS,
    SftDialog,
    first_sentence,
    module_definitions,
    reference_answer,
    stdlib_sft,
)

TOOLS = '''"""Tools for boxes."""
import sys


def add(a, b=1):
    """Add two numbers, e.g. 1 and 2.  Then return the sum.

    More text.
    """


def _private(x):
    """A private helper that is documented."""


def undocumented(x):
    return x


class Box(Base):
    """A box of things.

    Boxes hold things.
    """

    def __init__(self, size, *, label=None):
        """Make a box of ``size``."""

    def open(self, force=False) -> bool:
        """Open the box now!"""

    def __len__(self):
        """The number of things in the box."""

    @property
    def weight(self):
        """The weight of the box and its things."""

    def shut(self):
        """Shut."""

    class Lid:
        """The lid on top of a box"""


if sys.platform == "win32":
    def where():
        """Find the tools on Windows."""
else:
    def where():
        """Find the tools on other systems."""
'''

PACKAGE = '''def hello(name):
    """hello(name) -> str

    Say hello to someone by name.
    """
'''

# (id, signature, summary) of the dialogs from TOOLS and PACKAGE, in order
EXPECTED = [
    ("sft/pkg/hello/0", "pkg.hello(name)", "Say hello to someone by name."),
    ("sft/tools/add/0", "tools.add(a, b=1)", "Add two numbers, e.g. 1 and 2."),
    ("sft/tools/Box/0", "tools.Box(size, *, label=None)", "A box of things."),
    ("sft/tools/Box.open/0", "tools.Box.open(self, force=False) -> bool", "Open the box now!"),
    ("sft/tools/Box.Lid/0", "class tools.Box.Lid", "The lid on top of a box"),
    ("sft/tools/where/0", "tools.where()", "Find the tools on Windows."),
]


@pytest.fixture
def fake_stdlib(tmp_path):
    """A tiny stdlib: a module, a package, a private module, a test suite and site-packages."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(PACKAGE)
    (tmp_path / "pkg" / "_impl.py").write_text(
        'def secret():\n    """Not public at all, but documented."""\n'
    )
    (tmp_path / "tools.py").write_text(TOOLS)
    for folder in ("test", "site-packages"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "extra.py").write_text('def found():\n    """Should never be found."""\n')
    return tmp_path


@pytest.fixture(scope="module")
def stdlib_dialogs() -> list[SftDialog]:
    return list(stdlib_sft())


def test_fake_stdlib_gives_exactly_the_public_documented_definitions(fake_stdlib):
    dialogs = list(stdlib_sft(fake_stdlib))
    assert [d.id for d in dialogs] == [e[0] for e in EXPECTED]
    assert [d.group for d in dialogs] == ["pkg", "tools", "tools", "tools", "tools", "tools"]
    for dialog, (_, signature, summary) in zip(dialogs, EXPECTED, strict=True):
        assert [m["role"] for m in dialog.messages] == ["user", "assistant"]
        answer = reference_answer(dialog)
        answers = {t.format(sig=signature, summary=summary) for kind in ANSWERS for t in ANSWERS[kind]}
        assert answer in answers
        name = dialog.id.split("/")[1] + "." + dialog.id.split("/")[2]
        assert (
            f"`{name}`" in dialog.messages[0]["content"]
            or f"`{name.rpartition('.')[2]}`" in (dialog.messages[0]["content"])
        )


def test_module_definitions_read_signatures_and_first_sentences():
    found = module_definitions(TOOLS, "tools")
    assert [(d.qualname, d.noun, d.signature, d.summary, d.constructor) for d in found] == [
        ("add", "function", "tools.add(a, b=1)", "Add two numbers, e.g. 1 and 2.", False),
        ("Box", "class", "tools.Box(size, *, label=None)", "A box of things.", True),
        ("Box.open", "method", "tools.Box.open(self, force=False) -> bool", "Open the box now!", False),
        ("Box.Lid", "class", "class tools.Box.Lid", "The lid on top of a box", False),
        ("where", "function", "tools.where()", "Find the tools on Windows.", False),
    ]
    assert module_definitions("def broken(:\n", "broken") == []


@pytest.mark.parametrize(
    ("doc", "sentence"),
    [
        ("Return x.  More.", "Return x."),
        ("Spans\n    two lines. Then more.", "Spans two lines."),
        ("No full stop here\n\nSecond paragraph.", "No full stop here"),
        ("Uses i.e. and eg. abbreviations. Then more.", "Uses i.e. and eg. abbreviations."),
        ("Counts 1, 2, ... up. Then more.", "Counts 1, 2, ... up."),
        ("Ends here. lowercase next", "Ends here."),
        ("Apples, pears, etc. are fruit. Then more.", "Apples, pears, etc. are fruit."),
        ("f(x) -> int\n\nThe real summary. More.", "The real summary."),
        ("Really?  Yes.", "Really?"),
        ("", ""),
    ],
)
def test_first_sentence(doc, sentence):
    assert first_sentence(doc) == sentence


def test_first_sentence_is_cut_at_a_word():
    text = first_sentence("word " * 200)
    assert len(text) <= MAX_SUMMARY_CHARS
    assert text.endswith("word...")


def test_a_different_seed_changes_phrasings_not_ids(fake_stdlib):
    runs = {seed: list(stdlib_sft(fake_stdlib, seed=seed, per_definition=3)) for seed in range(6)}
    assert all([d.id for d in run] == [d.id for d in runs[0]] for run in runs.values())
    assert len({tuple(m["content"] for d in run for m in d.messages) for run in runs.values()}) > 1


def test_per_definition_asks_different_kinds(fake_stdlib):
    dialogs = list(stdlib_sft(fake_stdlib, per_definition=5))
    ids = [d.id for d in dialogs]
    assert ids.count("sft/tools/Box.Lid/0") == 1 and "sft/tools/Box.Lid/1" not in ids  # only "what"
    assert {i for i in ids if i.startswith("sft/tools/add/")} == {f"sft/tools/add/{k}" for k in range(3)}
    fields = {"name": "tools.add", "short": "add", "owner": "tools", "module": "tools", "noun": "function"}
    kind_of = {template.format(**fields): kind for kind in QUESTIONS for template in QUESTIONS[kind]}
    questions = [d.messages[0]["content"] for d in dialogs if d.id.startswith("sft/tools/add/")]
    assert {kind_of[question] for question in questions} == {"what", "signature", "call"}
    with pytest.raises(ValueError, match="per_definition"):
        next(stdlib_sft(fake_stdlib, per_definition=0))


def test_a_module_does_not_change_when_another_does(fake_stdlib):
    before = [d for d in stdlib_sft(fake_stdlib) if d.group == "tools"]
    (fake_stdlib / "pkg" / "__init__.py").write_text(PACKAGE + '\n\ndef bye():\n    """Say goodbye now."""\n')
    (fake_stdlib / "aaa.py").write_text('def first():\n    """Comes before all others."""\n')
    after = list(stdlib_sft(fake_stdlib))
    assert [d for d in after if d.group == "tools"] == before
    assert {"sft/pkg/bye/0", "sft/aaa/first/0"} <= {d.id for d in after}


def test_prompts_only_and_options(fake_stdlib):
    full = list(stdlib_sft(fake_stdlib, system="Answer briefly."))
    prompts = list(stdlib_sft(fake_stdlib, prompts_only=True, system="Answer briefly."))
    assert [(d.id, d.group) for d in prompts] == [(d.id, d.group) for d in full]
    for prompt, dialog in zip(prompts, full, strict=True):
        assert [m["role"] for m in dialog.messages] == ["system", "user", "assistant"]
        assert prompt.messages == dialog.messages[:-1]
        with pytest.raises(ValueError, match="no assistant answer"):
            reference_answer(prompt)
    capped = list(stdlib_sft(fake_stdlib, max_per_module=2))
    assert [d.id for d in capped] == ["sft/pkg/hello/0", "sft/tools/add/0", "sft/tools/Box/0"]


def test_stdlib_dialogs_are_well_formed(stdlib_dialogs):
    dialogs = stdlib_dialogs
    assert len(dialogs) > 3000
    assert len({d.id for d in dialogs}) == len(dialogs)
    assert len({d.group for d in dialogs}) > 100
    for dialog in dialogs:
        module, qualname, index = dialog.id.removeprefix("sft/").split("/")
        assert dialog.id.startswith("sft/") and index.isdigit()
        assert dialog.group == module
        assert not any(part.startswith("_") for part in [*module.split("."), *qualname.split(".")])
        assert [m["role"] for m in dialog.messages] == ["user", "assistant"]
        answer = reference_answer(dialog)
        assert len(answer) <= MAX_ANSWER_CHARS
        assert f"`{module}.{qualname}(" in answer or f"`class {module}.{qualname}" in answer
        render_dialog(dialog.messages)  # valid Llama 3 messages
    modules = [d.group for d in dialogs]
    assert "test" not in modules and not any(m.startswith("test.") for m in modules)


def _first_sentence_of(obj, paragraph: int = 0) -> str:
    """First sentence of a docstring, found independently of herd: up to the first '. '."""
    text = " ".join(inspect.getdoc(obj).split("\n\n")[paragraph].split())
    return text[: text.index(". ") + 1] if ". " in text else text


@pytest.mark.parametrize(
    ("dialog_id", "obj", "name", "paragraph"),
    [
        ("sft/json/dumps/0", json.dumps, "json.dumps", 0),
        ("sft/textwrap/dedent/0", textwrap.dedent, "textwrap.dedent", 0),
        # its docstring starts with a signature line, then the summary
        ("sft/textwrap/TextWrapper.wrap/0", textwrap.TextWrapper.wrap, "textwrap.TextWrapper.wrap", 1),
        # a class: the signature of its __init__ without self; a summary without a full stop
        ("sft/json.decoder/JSONDecoder/0", json.decoder.JSONDecoder, "json.decoder.JSONDecoder", 0),
    ],
)
def test_known_stdlib_answers(stdlib_dialogs, dialog_id, obj, name, paragraph):
    dialog = next(d for d in stdlib_dialogs if d.id == dialog_id)
    answer = reference_answer(dialog)
    assert f"`{name}{inspect.signature(obj)}`" in answer
    assert _first_sentence_of(obj, paragraph) in answer
    assert name in dialog.messages[0]["content"] or name.rpartition(".")[2] in dialog.messages[0]["content"]


def test_stdlib_signature_matches_the_source(stdlib_dialogs):
    """The signature is the source's, read here with ast for a function with annotations."""
    import asyncio.timeouts

    tree = ast.parse(inspect.getsource(asyncio.timeouts))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "timeout")
    expected = f"asyncio.timeouts.timeout({ast.unparse(node.args)}) -> {ast.unparse(node.returns)}"
    dialog = next(d for d in stdlib_dialogs if d.id == "sft/asyncio.timeouts/timeout/0")
    assert f"`{expected}`" in reference_answer(dialog)


def test_stdlib_runs_are_deterministic_and_seeds_change_phrasings(stdlib_dialogs):
    assert list(stdlib_sft()) == stdlib_dialogs
    other = list(stdlib_sft(seed=1, prompts_only=True))
    assert [(d.id, d.group) for d in other] == [(d.id, d.group) for d in stdlib_dialogs]
    changed = sum(o.messages[0] != d.messages[0] for o, d in zip(other, stdlib_dialogs, strict=True))
    assert 0.3 * len(other) < changed < len(other)
