"""Needle in a haystack: hide a pass key at a chosen depth of a long text, ask for it, score exact retrieval.

The haystack is real text (token ids of a validation split). For each (context length, depth)
cell, ``trials`` random 5-digit keys are hidden and the model is asked
"What is the pass key? The pass key is"; a trial counts when greedy decoding would produce
every token of the key, i.e. the argmax at each answer position is the key's next token
(one teacher-forced forward pass, the same verdict as generating).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from herd.data.embedded.passkey import NEEDLE, QUESTION  # the words the passkey documents train on


@dataclass
class NeedleResult:
    """Accuracy per (depth, length) cell; rows are depths, columns lengths."""

    lengths: list[int]
    depths: list[float]
    accuracy: np.ndarray = field(repr=False)  # (len(depths), len(lengths))

    @property
    def mean(self) -> float:
        """Mean accuracy over all cells."""
        return float(self.accuracy.mean())

    def at_length(self, length: int) -> float:
        """Mean accuracy over depths at one context length."""
        return float(self.accuracy[:, self.lengths.index(length)].mean())

    def table(self) -> str:
        """The heatmap as text: one row per depth, one column per length."""
        header = "depth \\ length " + " ".join(f"{n:>7}" for n in self.lengths)
        rows = [f"{d:>14.2f} " + " ".join(f"{a:>7.2f}" for a in row) for d, row in zip(self.depths, self.accuracy,
                                                                                      strict=True)]
        return "\n".join([header, *rows])

    def image(self, cell: int = 24) -> np.ndarray:
        """An RGB heatmap (H, W, 3) uint8 - red 0 to green 1 - for TensorBoard's add_image."""
        a = np.clip(self.accuracy, 0.0, 1.0)
        rgb = np.stack([(1 - a) * 220 + 20, a * 200 + 20, np.full_like(a, 40.0)], axis=-1).astype(np.uint8)
        return rgb.repeat(cell, axis=0).repeat(cell, axis=1)


def collect_haystack(
    batches: Iterable[dict[str, torch.Tensor]], n_tokens: int, drop_ids: Sequence[int],
    skip_rows_with: Sequence[int] = (),
) -> list[int]:
    """At least ``n_tokens`` ids of running text from batches of ``tokens``, without the ``drop_ids`` (bos/eos/pad).

    Rows that contain the id sequence ``skip_rows_with`` (the needle's own words) are left out, so
    the haystack never holds a distractor key.
    """
    drop = torch.tensor(list(drop_ids))
    marker = list(skip_rows_with)
    out: list[int] = []
    for batch in batches:
        for row in batch["tokens"]:
            if marker and _contains(row.tolist(), marker):
                continue
            out.extend(row[~torch.isin(row, drop)].tolist())
        if len(out) >= n_tokens:
            return out
    raise ValueError(f"the haystack text has only {len(out)} tokens; the longest needle test needs {n_tokens}")


def _contains(ids: list[int], marker: list[int]) -> bool:
    first = marker[0]
    return any(ids[i : i + len(marker)] == marker for i, token in enumerate(ids) if token == first)


@torch.no_grad()
def needle_accuracy(
    model: torch.nn.Module,
    tokenizer,
    haystack: Sequence[int],
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 4,
    seed: int = 0,
) -> NeedleResult:
    """Score exact pass-key retrieval per (depth, length) cell. ``tokenizer`` needs encode() and bos_id."""
    rng = random.Random(seed)
    question = tokenizer.encode(QUESTION)
    accuracy = np.zeros((len(depths), len(lengths)))
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                hits = 0
                for _ in range(trials):
                    key = f"{rng.randrange(10000, 100000)}"
                    needle, answer = tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(f" {key}")
                    filler = length - 1 - len(needle) - len(question) - len(answer)
                    if filler <= 0:
                        raise ValueError(f"needle length {length} is too short for the needle and question")
                    start = rng.randrange(0, len(haystack) - filler + 1)
                    text = list(haystack[start : start + filler])
                    cut = round(depth * filler)
                    row = tokenizer.with_bos([*text[:cut], *needle, *text[cut:], *question, *answer])
                    hits += bool(_retrieved(model, torch.tensor([row]), len(answer)))
                accuracy[i, j] = hits / trials
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return NeedleResult(list(lengths), list(depths), accuracy)


def _retrieved(model: torch.nn.Module, rows: torch.Tensor, answer_len: int) -> torch.Tensor:
    """Per row: does the argmax at every answer position equal the answer token?"""
    parameter = next(iter(model.parameters()), None)
    rows = rows.to(parameter.device if parameter is not None else "cpu")
    inputs, answer = rows[:, :-1], rows[:, -answer_len:]
    if hasattr(model, "hidden_states") and hasattr(model, "output"):  # logits only where they are scored
        logits = model.output(model.hidden_states(inputs)[:, -answer_len:])
    else:
        logits = model(inputs)[:, -answer_len:]
    return (logits.argmax(-1) == answer).all(dim=-1)
