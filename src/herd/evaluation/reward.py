"""Reward-model accuracy: how often a reward model scores the preferred response above the other.

A pair is a prompt, a chosen and a rejected response. Each response is encoded as a Llama 3
dialog (the prompt as the user's message, the response as the assistant's) and scored by the
reward model at its last token; the pair counts when ``reward(chosen) > reward(rejected)``.

Pairs come from a jsonl file of ``{"prompt", "chosen", "rejected"}`` lines (:func:`load_pairs`)
or from multiple-choice items (:func:`pairs_from_items`: the right choice against each wrong one;
with the embedded stdlib items, the right docstring of a function against another's).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.data.chat import ChatFormat
from herd.evaluation.mcq import Item


@dataclass(frozen=True)
class Pair:
    """A prompt and two responses, ``chosen`` preferred over ``rejected``."""

    prompt: str
    chosen: str
    rejected: str
    id: str = ""      # the item's id (pairs of one multiple-choice item share it)


def pairs_from_items(items: Sequence[Item]) -> list[Pair]:
    """One pair per wrong choice of each item: (question, right choice, that wrong choice)."""
    return [Pair(item.question, item.choices[item.answer], wrong, item.id)
            for item in items for i, wrong in enumerate(item.choices) if i != item.answer]


def load_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a jsonl file of ``{"prompt": str, "chosen": str, "rejected": str}`` lines; a pair's id is
    its ``id`` field, else ``<file name>:<line number>``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward_accuracy.pairs={path}: no such file; give a jsonl file of "
                                '{"prompt", "chosen", "rejected"} lines, or reward_accuracy.pairs=stdlib')
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "chosen",
                                                                                             "rejected")):
            raise ValueError(f"{path}:{number}: expected string fields prompt, chosen and rejected")
        pairs.append(Pair(record["prompt"], record["chosen"], record["rejected"],
                          str(record.get("id", f"{path.name}:{number}"))))
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


@torch.no_grad()
def rewards(reward_model: torch.nn.Module, rows: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """The reward of each row of token ids, read at its last token.

    Rows are padded on the right; a model with ``score(tokens, lengths)`` (herd's
    :class:`~herd.model.RewardModel`) reads each row at its length, any other module must map
    (batch, seq) ids to (batch, seq) rewards.
    """
    device = next(iter(reward_model.parameters())).device
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        lengths = torch.tensor([len(r) for r in chunk])
        tokens = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        for b, row in enumerate(chunk):
            tokens[b, : len(row)] = torch.tensor(list(row))
        tokens, lengths = tokens.to(device), lengths.to(device)
        if hasattr(reward_model, "score"):
            values = reward_model.score(tokens, lengths)
        else:
            values = reward_model(tokens).gather(1, (lengths - 1)[:, None]).squeeze(1)
        out += [float(v) for v in values.float().cpu()]
    return out


def reward_accuracy(reward_model: torch.nn.Module, chat: ChatFormat, pairs: Sequence[Pair],
                    batch_size: int = 8) -> tuple[float, float, int]:
    """(accuracy, mean margin reward(chosen) - reward(rejected), number of pairs).

    Each answer is scored as the dialog (the prompt as a user message, the answer) in the chat
    format ``chat``, read at the answer's end-of-turn token.
    """
    if not pairs:
        raise ValueError("no preference pairs to evaluate")

    def encoded(prompt: str, response: str) -> list[int]:
        return chat.response_ids([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])

    chosen = rewards(reward_model, [encoded(p.prompt, p.chosen) for p in pairs], batch_size)
    rejected = rewards(reward_model, [encoded(p.prompt, p.rejected) for p in pairs], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return sum(m > 0 for m in margins) / len(pairs), sum(margins) / len(pairs), len(pairs)
