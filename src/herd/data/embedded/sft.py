"""An embedded supervised fine-tuning set: questions about stdlib functions, answered by their docs.

Like the ``stdlib:prose`` corpus (:mod:`herd.data.inputs`), it is read from the running Python's
standard library with :mod:`ast` (nothing is imported or executed), so SFT runs offline. Each
documented public function, method and class gives a dialog: the user asks what it does, for its
signature, or how to call it, and the assistant answers with the signature, as written in the
source, and the first sentence of the docstring::

    user:       What does `json.dumps` do?
    assistant:  `json.dumps(obj, *, skipkeys=False, ensure_ascii=True, ...)`: Serialize ``obj``
                to a JSON formatted ``str``.

Question and answer phrasings are drawn from a few templates by a :class:`random.Random` seeded
from ``seed`` and the definition's module and name, so a module's dialogs do not change when
another module changes, and a different seed changes phrasings but not the dialog ids.

What is left out: private names (any part starting with ``_``, so dunder methods too), private
modules (``_pydecimal``, ``concurrent.futures._base``, ``__main__``), properties and
``typing.overload`` stubs, and docstrings whose first sentence is shorter than
:data:`MIN_SUMMARY_CHARS` (``"Constructor."``). A first sentence longer than
:data:`MAX_SUMMARY_CHARS` is cut at a word and ends with ``...``; a definition whose signature
is longer than :data:`MAX_SIGNATURE_CHARS` is left out, so every answer is at most
:data:`MAX_ANSWER_CHARS` long. When a module defines a name twice (per platform, say), the
first definition is used.

Dialogs come in sorted module path order, then source order. Each has a stable ``id``
(``sft/json.decoder/JSONDecoder.decode/0``) and a ``group``, the module name: held-out splits
should assign whole groups, so that no module's functions are in both splits.
"""

from __future__ import annotations

import ast
import itertools
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from herd.data.embedded.corpus import module_name, nested_statements, stdlib_dir, stdlib_files

logger = logging.getLogger(__name__)

STDLIB_SFT = "stdlib:sft"

# A first sentence shorter than this ("Constructor.", "Internal use.") teaches nothing.
MIN_SUMMARY_CHARS = 16
# A longer first sentence is cut at a word boundary and ends with "...".
MAX_SUMMARY_CHARS = 300
# Definitions with a longer signature (subprocess.Popen's) are left out.
MAX_SIGNATURE_CHARS = 200
# The longest answer template around a signature and a summary.
MAX_ANSWER_CHARS = 600

# Question kinds: what a definition does, its signature, how to call it.
KINDS = ("what", "signature", "call")

# Placeholders: {name} the dotted name (json.decoder.JSONDecoder.decode), {short} its last part,
# {owner} the module or class it belongs to, {module} the module, {noun} function/method/class.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "what": (
        "What does `{name}` do?",
        "What is `{name}` for?",
        "Explain `{name}` in one sentence.",
        "In Python's `{module}` module, what does the {noun} `{short}` do?",
        "Briefly, what is the purpose of the {noun} `{name}`?",
    ),
    "signature": (
        "What is the signature of `{name}`?",
        "What arguments does `{name}` take?",
        "Which parameters does the {noun} `{short}` of `{owner}` accept?",
    ),
    "call": (
        "How do I call `{name}`?",
        "How do I use `{short}` from `{owner}`?",
        "Show me how to call the {noun} `{name}`.",
    ),
    # a class, asked how to make one
    "construct": (
        "How do I create a `{name}` object?",
        "How do I instantiate `{short}` from `{owner}`?",
        "What arguments does the `{name}` constructor take?",
    ),
}

# Placeholders: {sig} the signature, {summary} the first sentence of the docstring.
_EVERY_ANSWER = ("`{sig}`: {summary}", "`{sig}`\n\n{summary}")
ANSWERS: dict[str, tuple[str, ...]] = {
    "what": (*_EVERY_ANSWER, "{summary}\n\nSignature: `{sig}`"),
    "signature": (*_EVERY_ANSWER, "The signature is `{sig}`. {summary}"),
    "call": (*_EVERY_ANSWER, "Call it as `{sig}`. {summary}"),
    "construct": (*_EVERY_ANSWER, "Create one with `{sig}`. {summary}"),
    # a class without an __init__ of its own: its header stands for the signature
    "header": (*_EVERY_ANSWER, "{summary} It is defined as `{sig}`."),
}

_NOT_CALLED = frozenset({"property", "cached_property", "abstractproperty", "overload"})
_ABBREVIATIONS = frozenset({"e.g", "i.e", "eg", "ie", "cf", "vs", "viz", "approx", "resp"})
_SIGNATURE_LINE = re.compile(r"[\w.]+\(.*\)(\s*->.*)?", re.DOTALL)


@dataclass(frozen=True)
class SftDialog:
    """One dialog: a stable id, its group (the module) and its Llama 3 messages.

    ``messages`` are ``{"role": ..., "content": ...}`` dicts (see :mod:`herd.data.chat`): an
    optional system message, the user's question and the assistant's answer (left out with
    ``prompts_only``).
    """

    id: str
    group: str
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Definition:
    """A documented public function, method or class of one module.

    ``signature`` is the dotted name with the parameters as written in the source
    (``json.dumps(obj, *, skipkeys=False, ...)``); for a class, those of its ``__init__``
    without ``self``, or its header (``class json.decoder.JSONDecodeError(ValueError)``) when
    it defines no ``__init__`` (``constructor`` tells which).
    """

    module: str
    qualname: str
    noun: str  # "function", "method" or "class"
    signature: str
    summary: str
    constructor: bool = False

    @property
    def name(self) -> str:
        """The dotted name: module and qualified name."""
        return f"{self.module}.{self.qualname}"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The question kinds this definition can answer."""
        if self.noun != "class":
            return KINDS
        return ("what", "construct") if self.constructor else ("what",)


def stdlib_sft(
    root: Path | None = None,
    seed: int = 0,
    prompts_only: bool = False,
    *,
    per_definition: int = 1,
    max_per_module: int | None = None,
    system: str | None = None,
) -> Iterator[SftDialog]:
    """Question-answer dialogs about the documented public definitions of the stdlib at ``root``.

    ``root`` defaults to the running Python's stdlib. Each definition gives up to
    ``per_definition`` dialogs (ids ending ``/0``, ``/1``, ...), each asking a different kind
    of question (a class without ``__init__`` gives one). ``max_per_module`` keeps the first
    definitions of each module, in source order. ``system``, if given, is a system message put
    first. With ``prompts_only`` the dialogs end with the user's question (same ids and
    groups), for sampling answers.
    """
    if per_definition < 1:
        raise ValueError(f"stdlib_sft: per_definition={per_definition} must be at least 1")
    for _, found in itertools.groupby(stdlib_definitions(root), key=lambda definition: definition.module):
        for count, definition in enumerate(found):
            if max_per_module is not None and count >= max_per_module:
                break
            yield from definition_dialogs(definition, seed, prompts_only, per_definition, system)


def stdlib_definitions(root: Path | None = None, keep: Callable[[str], bool] | None = None) -> Iterator[Definition]:
    """The documented public definitions of the public stdlib modules at ``root``, in sorted module path
    order, then source order: those :func:`stdlib_sft` asks about.

    ``keep``, if given, is asked about each module's file path relative to ``root``
    (``json/decoder.py``) and leaves out the modules it refuses, before they are parsed.
    """
    root = (root or stdlib_dir()).resolve()
    for path in stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        module = module_name(relative)
        if any(part.startswith("_") for part in module.split(".")) or (keep is not None and not keep(relative)):
            continue
        yield from module_definitions(path.read_bytes(), module)


def definition_dialogs(
    definition: Definition,
    seed: int = 0,
    prompts_only: bool = False,
    per_definition: int = 1,
    system: str | None = None,
) -> Iterator[SftDialog]:
    """The dialogs of one definition; phrasings depend only on ``seed`` and its name."""
    rng = random.Random(f"herd.sft:{seed}:{definition.module}:{definition.qualname}")
    kinds = definition.kinds
    start = rng.randrange(len(kinds))
    owner = definition.name.rpartition(".")[0]
    fields = {
        "name": definition.name,
        "short": definition.qualname.rpartition(".")[2],
        "owner": owner,
        "module": definition.module,
        "noun": definition.noun,
        "sig": definition.signature,
        "summary": definition.summary,
    }
    for index in range(min(per_definition, len(kinds))):
        kind = kinds[(start + index) % len(kinds)]
        question = rng.choice(QUESTIONS[kind]).format(**fields)
        answer_kind = "header" if definition.noun == "class" and not definition.constructor else kind
        answer = rng.choice(ANSWERS[answer_kind]).format(**fields)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        if not prompts_only:
            messages.append({"role": "assistant", "content": answer})
        yield SftDialog(f"sft/{definition.module}/{definition.qualname}/{index}", definition.module, messages)


def reference_answer(dialog: SftDialog) -> str:
    """The assistant's answer of a full dialog (not of a ``prompts_only`` one)."""
    if not dialog.messages or dialog.messages[-1]["role"] != "assistant":
        raise ValueError(
            f"dialog {dialog.id} has no assistant answer (made with prompts_only=True?); "
            "take reference answers from the full dialogs, which have the same ids"
        )
    return dialog.messages[-1]["content"]


def module_definitions(source: bytes | str, module: str) -> list[Definition]:
    """The documented public definitions of one module's source, in source order.

    A module that does not parse gives none (with a warning).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as err:
        logger.warning("skipping SFT questions about %s: it does not parse (%s)", module, err)
        return []
    seen: set[str] = set()
    found = []
    for definition in _walk(tree.body, module, ""):
        if definition.qualname not in seen:
            seen.add(definition.qualname)
            found.append(definition)
    return found


def _walk(body: list[ast.stmt], module: str, owner: str) -> Iterator[Definition]:
    """Definitions in ``body`` (of a module, or of class ``owner``), in source order."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            yield from _walk(nested_statements(node), module, owner)
            continue
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_"):
            continue
        qualname = f"{owner}.{node.name}" if owner else node.name
        if isinstance(node, ast.ClassDef):
            if definition := _class_definition(node, module, qualname):
                yield definition
            yield from _walk(node.body, module, qualname)
        elif not any(_decorator_name(d) in _NOT_CALLED or _is_accessor(d) for d in node.decorator_list):
            signature = f"{module}.{qualname}({ast.unparse(node.args)})"
            if node.returns is not None:
                signature += f" -> {ast.unparse(node.returns)}"
            noun = "method" if owner else "function"
            if definition := _documented(node, module, qualname, noun, signature):
                yield definition


def _class_definition(node: ast.ClassDef, module: str, qualname: str) -> Definition | None:
    init = next(
        (n for n in _class_statements(node) if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
        None,
    )
    if init is None:
        bases = ", ".join(ast.unparse(base) for base in [*node.bases, *node.keywords])
        signature = f"class {module}.{qualname}({bases})" if bases else f"class {module}.{qualname}"
        return _documented(node, module, qualname, "class", signature)
    arguments = _without_first(init.args)
    return _documented(
        node, module, qualname, "class", f"{module}.{qualname}({ast.unparse(arguments)})", True
    )


def _class_statements(node: ast.ClassDef) -> Iterator[ast.stmt]:
    """The statements of a class body, including those inside if/try/with blocks."""
    for statement in node.body:
        if isinstance(statement, (ast.If, ast.Try, ast.With)):
            yield from nested_statements(statement)
        else:
            yield statement


def _without_first(arguments: ast.arguments) -> ast.arguments:
    """``arguments`` less its first positional parameter (``self``), if it has one."""
    trimmed = ast.arguments(
        posonlyargs=list(arguments.posonlyargs),
        args=list(arguments.args),
        vararg=arguments.vararg,
        kwonlyargs=arguments.kwonlyargs,
        kw_defaults=arguments.kw_defaults,
        kwarg=arguments.kwarg,
        defaults=list(arguments.defaults),
    )
    positional = len(trimmed.posonlyargs) + len(trimmed.args)
    if positional == 0:
        return trimmed
    if len(trimmed.defaults) == positional:  # self with a default: drop that default too
        trimmed.defaults.pop(0)
    (trimmed.posonlyargs if trimmed.posonlyargs else trimmed.args).pop(0)
    return trimmed


def _documented(
    node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef,
    module: str,
    qualname: str,
    noun: str,
    signature: str,
    constructor: bool = False,
) -> Definition | None:
    """The definition if its docstring has a useful first sentence and its signature is short."""
    doc = ast.get_docstring(node)
    if not doc or len(signature) > MAX_SIGNATURE_CHARS:
        return None
    summary = first_sentence(doc)
    if len(summary) < MIN_SUMMARY_CHARS or summary.endswith(":"):  # ":" announces what is not there
        return None
    return Definition(module, qualname, noun, signature, summary, constructor)


def _decorator_name(decorator: ast.expr) -> str:
    """``property`` for ``@property``, ``@functools.cached_property`` or ``@typing.overload()``."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target).rpartition(".")[2]


def _is_accessor(decorator: ast.expr) -> bool:
    """Whether the decorator is ``@name.setter``, ``.getter`` or ``.deleter`` of a property."""
    return isinstance(decorator, ast.Attribute) and decorator.attr in {"setter", "getter", "deleter"}


def first_sentence(doc: str, limit: int = MAX_SUMMARY_CHARS) -> str:
    """The first sentence of a (cleaned) docstring, on one line, at most ``limit`` characters.

    A first paragraph that is only a signature (``dumps(obj) -> str``) is skipped. The
    sentence ends at ``.``, ``!`` or ``?`` followed by the end or by a space, except in an
    ellipsis, in ``e.g.`` or ``i.e.``, and in ``etc.`` followed by a lowercase word; without
    one, it is the whole first paragraph. A longer sentence is cut at a word boundary and
    ends with ``...``.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    if len(paragraphs) > 1 and _SIGNATURE_LINE.fullmatch(paragraphs[0].strip()):
        paragraphs.pop(0)
    if not paragraphs:
        return ""
    text = " ".join(paragraphs[0].split())
    for match in re.finditer(r"(?<!\.)[.!?](?=\s|$)", text):
        following = text[match.end() :].lstrip()
        word = text[: match.start()].rpartition(" ")[2].lstrip("([").lower()
        if word in _ABBREVIATIONS or (word == "etc" and following[:1].islower()):
            continue
        text = text[: match.end()]
        break
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit - 2)
        text = text[: cut if cut > 0 else limit - 3].rstrip(",;:") + "..."
    return text
