"""Evaluation items left out because the training data holds them (``herd.evaluate exclude=...``).

The list is the ``contaminated.jsonl`` that ``herd.curate``'s decontaminate block writes, one JSON
object a line: ``{"set": <its eval_sets name>, "id": <the item's id>, "coverage": ..., "seen_in":
...}``. Only ``id`` is read to match (``set`` names the decontaminate block's set, which the
evaluation does not know); an item whose id is listed is left out, whatever task runs it. The ids
are the ones both sides give an item:

- a jsonl item (``mcq.items``, ``reward_accuracy.pairs``, an ``eval_sets`` jsonl): its ``id``
  field, else ``<file name>:<line number>``;
- the embedded stdlib multiple-choice items (``mcq.items=stdlib``, decontaminate's
  ``stdlib:mcq``): ``<module>.<qualified name>`` of the definition asked about.

Items are left out after the set is chosen (``mcq.max_items``), so the others are the same items,
scored as without the list. An empty file excludes nothing (no contaminated item was found).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

FIX = "give the contaminated.jsonl that herd.curate's decontaminate block wrote, or exclude=null"


@dataclass(frozen=True)
class Excluded:
    """The ids listed in an exclusion file, and the file."""

    path: Path
    ids: frozenset[str]

    def split(self, items: Sequence[T], item_id: Callable[[T], str]) -> tuple[list[T], list[T]]:
        """(kept, left out): the items in their order, those whose id is listed left out."""
        kept, dropped = [], []
        for item in items:
            (dropped if item_id(item) in self.ids else kept).append(item)
        return kept, dropped


def load_excluded(path: str | Path) -> Excluded:
    """The ids of an exclusion file (see the module docstring); errors name the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exclude={path}: no such file; {FIX}")
    ids = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"exclude={path}: not UTF-8 text; {FIX}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"exclude={path}:{number}: not JSON; {FIX}") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
            raise ValueError(f"exclude={path}:{number}: expected an object with a string 'id' (and 'set'); {FIX}")
        ids.add(record["id"])
    return Excluded(path, frozenset(ids))
