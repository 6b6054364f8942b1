"""An embedded preference set: answers about stdlib functions, ranked edited > chosen > rejected.

It asks the questions of the ``stdlib:sft`` set (:mod:`herd.data.embedded.sft`) and ranks three answers
to each, like the Llama 3 paper's rankings of an edited, a chosen and a rejected response::

    user:       What arguments does `json.dumps` take?
    edited:     `json.dumps(obj, *, skipkeys=False, ...)` Serialize ``obj`` to a JSON formatted ``str``.
    chosen:     `json.load(obj, *, skipkeys=False, ...)` Serialize ``obj`` to a JSON formatted ``str``.
    rejected:   `json.loads(s, *, cls=None, ...)` Deserialize ``s`` (a ``str``, ``bytes`` or ...

- **edited** (rank 0) is the true answer, exactly ``stdlib:sft``'s for the same seed: the
  signature as written in the source and the first sentence of the docstring.
- **chosen** (rank 1) is the same answer with one detail wrong that the question lets a reader
  check: the name in the signature is another definition's (``json.dumps`` becomes
  ``json.load``).
- **rejected** (rank 2) is another definition's answer (its signature and docstring sentence),
  in the same phrasing as the edited one.

The other definitions come from the same module, so a held-out module's text stays out of the
train split; names whose last part differs from the asked one are preferred, and the rejected
answer comes from a different definition than the wrong name where the module has two or more
others. A module with a single documented definition borrows them from the nearest module
before it in sorted order (after it, for the first), keeping its own module name in the wrong
signature; such a module's examples change when that neighbour changes, no other module's do.
Which definitions are used is drawn by a :class:`random.Random` seeded from ``seed`` and the
asked definition's module and name. An example whose three answers are not all different is
left out.

Examples come in sorted module path order, then source order. Each has a stable ``id``
(``pref/json/dumps/0``) and a ``group``, the module, so that held-out splits assign whole
modules, as they do for ``stdlib:sft``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from herd.data.embedded.corpus import module_name, stdlib_dir, stdlib_files
from herd.data.embedded.sft import Definition, definition_dialogs, module_definitions, reference_answer

STDLIB_PREFERENCES = "stdlib:preferences"
# The answers of an example, by rank (0 = best).
LABELS = ("edited", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceExample:
    """One ranked example: a stable id, its group (the module), the prompt and three answers.

    ``prompt`` holds the Llama 3 messages before the answer (an optional system message and the
    user's question); ``answers`` the edited, chosen and rejected answers, in rank order.
    ``wrong_name`` is the name the chosen answer's signature uses instead of the asked one, and
    ``rejected_from`` the dotted name of the definition whose answer was rejected.
    """

    id: str
    group: str
    prompt: list[dict[str, str]]
    answers: tuple[str, str, str]
    wrong_name: str
    rejected_from: str

    @property
    def edited(self) -> str:
        """The true answer (rank 0)."""
        return self.answers[0]

    @property
    def chosen(self) -> str:
        """The true answer with a wrong name in its signature (rank 1)."""
        return self.answers[1]

    @property
    def rejected(self) -> str:
        """Another definition's answer (rank 2)."""
        return self.answers[2]

    def record(self) -> dict[str, Any]:
        """The example as a line of the ranking jsonl layout (see :mod:`herd.data.kinds.preference`)."""
        return {
            "id": self.id,
            "group": self.group,
            "prompt": [dict(message) for message in self.prompt],
            "responses": [{"content": answer, "rank": rank} for rank, answer in enumerate(self.answers)],
        }


def stdlib_preferences(
    root: Path | None = None,
    seed: int = 0,
    *,
    max_per_module: int | None = None,
    system: str | None = None,
) -> Iterator[PreferenceExample]:
    """Ranked answers about the documented public definitions of the stdlib at ``root``.

    ``root`` defaults to the running Python's stdlib. ``seed`` changes the phrasings (as in
    ``stdlib:sft``) and the wrong names and answers, not the ids. ``max_per_module`` asks about
    the first definitions of each module only, in source order (the wrong names and answers are
    still drawn from all of them); ``system``, if given, is a system message put first.
    """
    root = (root or stdlib_dir()).resolve()
    modules = []
    for path in stdlib_files(root):
        module = module_name(path.relative_to(root).as_posix())
        if any(part.startswith("_") for part in module.split(".")):
            continue
        if found := module_definitions(path.read_bytes(), module):
            modules.append(found)
    for index, found in enumerate(modules):
        for count, definition in enumerate(found):
            if max_per_module is not None and count >= max_per_module:
                break
            others = _others(modules, index, definition)
            if others and (example := ranked_answers(definition, others, seed, system)):
                yield example


def _others(modules: list[list[Definition]], index: int, definition: Definition) -> list[Definition]:
    """Definitions other than ``definition`` in its module or, failing that, the nearest module."""
    for distance in range(len(modules)):
        for near in (index - distance, index + distance) if distance else (index,):
            if 0 <= near < len(modules):
                others = [d for d in modules[near] if d.qualname != definition.qualname]
                if others:
                    return others
    return []


def ranked_answers(
    definition: Definition, others: list[Definition], seed: int = 0, system: str | None = None
) -> PreferenceExample | None:
    """The example asking about ``definition``, its wrong name and answer drawn from ``others``.

    None when the three answers are not all different.
    """
    rng = random.Random(f"herd.preferences:{seed}:{definition.module}:{definition.qualname}")
    renamed = rng.choice([d for d in others if _short(d) != _short(definition)] or others)
    answers_from = [d for d in others if d is not renamed] or others
    source = rng.choice([d for d in answers_from if d.summary != definition.summary] or answers_from)
    wrong_name = f"{definition.module}.{renamed.qualname}"
    wrong = replace(definition, signature=_renamed(definition, wrong_name))
    other = replace(definition, signature=source.signature, summary=source.summary)
    # The same module and qualname draw the same question and answer phrasing: only the details differ.
    dialogs = [next(definition_dialogs(d, seed, system=system)) for d in (definition, wrong, other)]
    answers = tuple(reference_answer(dialog) for dialog in dialogs)
    if len(set(answers)) < len(answers):
        return None
    return PreferenceExample(
        id=f"pref/{definition.module}/{definition.qualname}/0",
        group=definition.module,
        prompt=dialogs[0].messages[:-1],
        answers=answers,
        wrong_name=wrong_name,
        rejected_from=source.name,
    )


def _short(definition: Definition) -> str:
    return definition.qualname.rpartition(".")[2]


def _renamed(definition: Definition, name: str) -> str:
    """The signature of ``definition`` with its dotted name replaced by ``name``."""
    prefix = "class " if definition.signature.startswith("class ") else ""
    rest = definition.signature.removeprefix(prefix)
    if not rest.startswith(definition.name):
        raise ValueError(f"the signature {definition.signature!r} does not start with {definition.name!r}")
    return prefix + name + rest[len(definition.name) :]
