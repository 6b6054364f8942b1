"""Answers to held-out questions: greedy generation in the chat format, scored by token F1.

Token F1 compares the words of an answer with those of the reference answer: lower-cased words
(runs of letters, digits and ``_``), counted as a multiset; F1 = 2PR / (P + R) of the overlap. It
is the plain metric of extractive QA, and it rewards an answer that gets the signature and the
first docstring sentence right whatever the phrasing around them.

Held-out dialogs come from the embedded ``stdlib:sft`` set (the modules that ``herd.prepare``
assigns to ``val``) or from a jsonl file of ``{"messages": [...]}`` lines whose last message is
the assistant's reference answer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased words (runs of letters, digits and ``_``)."""
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the word multisets of ``prediction`` and ``reference`` (1.0 when both are empty)."""
    predicted, expected = Counter(words(prediction)), Counter(words(reference))
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((predicted & expected).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(predicted.values()), overlap / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class HeldOut:
    """A question (the dialog up to the answer) and its reference answer."""

    prompt: list[dict[str, Any]]
    reference: str


def held_out_dialogs(source: str = "stdlib:sft", count: int = 32, val_fraction: float = 0.02) -> list[HeldOut]:
    """The first ``count`` held-out questions of ``source``: ``stdlib:sft`` (its val modules) or a jsonl file."""
    if source == "stdlib:sft" or source.startswith("stdlib:sft?"):
        from herd.data.embedded.sft import reference_answer, stdlib_sft
        from herd.data.kinds import assign_split

        out = []
        for dialog in stdlib_sft():
            if assign_split(dialog.group, val_fraction) == "val":
                out.append(HeldOut(list(dialog.messages[:-1]), reference_answer(dialog)))
                if len(out) == count:
                    break
        return out
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"held-out dialogs {source}: no such file; use stdlib:sft or a jsonl of "
                                '{"messages": [...]} lines ending with the assistant\'s answer')
    out = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: expected a JSON object with 'messages' ({err})") from None
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{number}: the last message must be the assistant's reference answer")
            out.append(HeldOut(messages[:-1], messages[-1]["content"]))
            if len(out) == count:
                break
    return out


@torch.no_grad()
def answer(model, tokenizer, prompts: Sequence[Sequence[dict[str, Any]]], max_new_tokens: int = 64,
           batch_size: int = 16) -> list[str]:
    """Greedy answers of ``model`` to dialogs ending with a user message, in the Llama 3 chat format."""
    from herd.data.chat import encode_dialog
    from herd.model import generate

    stop_ids = [tokenizer.special_id("eot_id"), tokenizer.special_id("eom_id")]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [encode_dialog(tokenizer, p, add_generation_prompt=True).ids for p in prompts[start:start + batch_size]]
            outputs = generate(model, [torch.tensor(ids, device=device) for ids in batch], max_new_tokens,
                               stop_ids=stop_ids)
            for new in outputs:
                ids = [int(t) for t in new if int(t) not in stop_ids]
                answers.append(tokenizer.decode(ids).strip())
    finally:
        model.train(was_training)
    return answers


def answer_f1(model, tokenizer, held_out: Sequence[HeldOut], max_new_tokens: int = 64,
              batch_size: int = 16) -> tuple[float, list[str]]:
    """Mean token F1 of the model's greedy answers against the references, and the answers."""
    answers = answer(model, tokenizer, [h.prompt for h in held_out], max_new_tokens, batch_size)
    scores = [token_f1(a, h.reference) for a, h in zip(answers, held_out, strict=True)]
    return (sum(scores) / len(scores) if scores else 0.0), answers
