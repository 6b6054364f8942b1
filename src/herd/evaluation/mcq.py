"""Multiple-choice questions scored by log-likelihood, with the robustness variants of the Llama 3 paper.

An item is a question, its choices and the index of the right one. A *variant* decides how the
item is shown: the order of its choices, the prompt format and the answer labels. For each
variant the prompt lists the labelled choices, and each choice is scored as the continuation
the model would write after the prompt (its label and its text)::

    Question: Which docstring belongs to `sched.scheduler.run(self, blocking=True)`?
    A. Execute events until the queue is empty.
    B. Return the current process's ...
    Answer:                                   <- prompt
     A. Execute events until the queue is empty.   <- continuation of choice A

The model picks the choice whose continuation has the highest log-likelihood, under three
normalisations, all reported:

- ``raw``: the summed log-probability of the continuation's tokens;
- ``per_token``: that sum divided by the continuation's number of tokens;
- ``per_char``: that sum divided by the continuation's number of characters.

Ties go to the earlier choice. Context ids are ``<|begin_of_text|>`` + the prompt's ids, and the
continuation is encoded on its own (it starts with a space); a context too long for the model
is cut from the left.

Robustness, as in the paper's section 5.2: from a *base* variant (the items' own order, the first
format, the first label set) one thing changes at a time:

- ``order``: the right answer moved to each position in turn (the others keep their order), so
  a model that always answers "A" scores 1 on one variant and 0 on the others;
- ``format``: each other prompt format (:data:`FORMATS`);
- ``labels``: each other label set (:data:`LABEL_SETS`: letters, numbers, none).

Accuracy is reported per variant and as mean, standard deviation (population), min and max over
all variants and over each axis.

Items come from a jsonl file (``{"question", "choices", "answer"}``, see :func:`load_items`) or
from the embedded stdlib set (:func:`stdlib_items`: "which docstring belongs to this function?",
4 choices, from modules held out of the prepared data's training split).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from herd.data.embedded.sft import stdlib_definitions
from herd.data.kinds import assign_split
from herd.logs import Progress
from herd.model.loss import target_logps

NORMALISATIONS = ("raw", "per_token", "per_char")
AXES = ("order", "format", "labels")
STDLIB_ITEMS = "stdlib"

LABEL_SETS: dict[str, tuple[str, ...] | None] = {
    "letters": tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "numbers": tuple(str(i) for i in range(1, 27)),
    "none": None,
}


@dataclass(frozen=True)
class PromptFormat:
    """How an item becomes a prompt and its choices continuations.

    ``template`` has ``{question}`` and ``{choices}``; ``choice`` renders one listed choice from
    ``{label}`` and ``{text}`` (``bare_choice`` without labels), joined by ``separator``;
    ``answer`` (``bare_answer``) is the scored continuation.
    """

    template: str
    choice: str
    bare_choice: str
    separator: str
    answer: str
    bare_answer: str


FORMATS: dict[str, PromptFormat] = {
    "question_answer": PromptFormat("Question: {question}\n{choices}\nAnswer:", "{label}. {text}", "- {text}", "\n",
                                    " {label}. {text}", " {text}"),
    "plain": PromptFormat("{question}\n\n{choices}\n\nThe answer is", "({label}) {text}", "* {text}", "\n",
                          " ({label}) {text}", " {text}"),
    "inline": PromptFormat("Q: {question} Options: {choices} A:", "{label}) {text}", "{text}", " | ",
                           " {label}) {text}", " {text}"),
}


@dataclass(frozen=True)
class Item:
    """A question, its choices (at least two, all different) and ``answer``, the right choice's index."""

    question: str
    choices: tuple[str, ...]
    answer: int
    id: str = ""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"item {self.id or self.question[:40]!r}: needs at least 2 choices")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"item {self.id or self.question[:40]!r}: its choices are not all different")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"item {self.id or self.question[:40]!r}: answer {self.answer} is not the index of "
                             f"one of its {len(self.choices)} choices")

    def permuted(self, order: Sequence[int]) -> Item:
        """The item with ``choices[order[0]]`` first, ``choices[order[1]]`` second, ...; the answer follows."""
        if sorted(order) != list(range(len(self.choices))):
            raise ValueError(f"{list(order)} is not a permutation of {len(self.choices)} choices")
        return replace(self, choices=tuple(self.choices[i] for i in order), answer=list(order).index(self.answer))

    def answer_at(self, position: int) -> Item:
        """The item with its right answer moved to ``position``; the other choices keep their order."""
        others = [i for i in range(len(self.choices)) if i != self.answer]
        return self.permuted([*others[:position], self.answer, *others[position:]])


@dataclass(frozen=True)
class Variant:
    """How items are shown: ``order`` (None: their own; k: the answer at position k), format, labels."""

    order: int | None
    format: str
    labels: str
    axis: str = "base"

    @property
    def name(self) -> str:
        """``base``, or the one setting that differs from it: ``order=answer@1``, ``format=plain``, ``labels=none``."""
        if self.axis == "order":
            return f"order=answer@{self.order + 1}"
        if self.axis == "format":
            return f"format={self.format}"
        if self.axis == "labels":
            return f"labels={self.labels}"
        return "base"

    def apply(self, item: Item) -> Item:
        """The item in this variant's order."""
        return item if self.order is None else item.answer_at(self.order)


def robustness_variants(formats: Sequence[str], labels: Sequence[str], positions: int) -> list[Variant]:
    """The base variant, then one change at a time: the answer at each of ``positions``, each other
    format, each other label set."""
    for name in formats:
        if name not in FORMATS:
            raise ValueError(f"mcq.formats: {name!r} is not a prompt format; choose from {sorted(FORMATS)}")
    for name in labels:
        if name not in LABEL_SETS:
            raise ValueError(f"mcq.labels: {name!r} is not a label set; choose from {sorted(LABEL_SETS)}")
    if not formats or not labels:
        raise ValueError("mcq.formats and mcq.labels need at least one entry each")
    base = Variant(None, formats[0], labels[0])
    out = [base]
    out += [replace(base, order=k, axis="order") for k in range(positions)]
    out += [replace(base, format=f, axis="format") for f in formats[1:]]
    out += [replace(base, labels=lab, axis="labels") for lab in labels[1:]]
    return out


def render(item: Item, format_name: str, labels_name: str) -> tuple[str, list[str]]:
    """The prompt and one continuation per choice (in the item's order)."""
    fmt, labels = FORMATS[format_name], LABEL_SETS[labels_name]
    if labels is not None and len(item.choices) > len(labels):
        raise ValueError(f"item {item.id!r} has {len(item.choices)} choices; label set {labels_name} has "
                         f"{len(labels)} labels")
    if labels is None:
        listed = [fmt.bare_choice.format(text=text) for text in item.choices]
        answers = [fmt.bare_answer.format(text=text) for text in item.choices]
    else:
        listed = [fmt.choice.format(label=label, text=text) for label, text in zip(labels, item.choices, strict=False)]
        answers = [fmt.answer.format(label=label, text=text) for label, text in zip(labels, item.choices,
                                                                                    strict=False)]
    return fmt.template.format(question=item.question, choices=fmt.separator.join(listed)), answers


# --------------------------------------------------------------------------------------------- items


def load_items(path: str | Path) -> list[Item]:
    """Items from a jsonl file, one ``{"question": str, "choices": [str, ...], "answer": ...}`` per line.

    ``answer`` is the 0-based index of the right choice, or its letter (``"B"``). An item's id is its
    ``id`` field, else ``<file name>:<line number>`` (as ``herd.curate``'s decontaminate block names
    it). Blank lines are skipped; anything else that is not such an item is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mcq.items={path}: no such file; give a jsonl file of "
                                '{"question", "choices", "answer"} lines, or mcq.items=stdlib')
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where}: not JSON ({err})") from None
        items.append(_item_from_record(record, where, f"{path.name}:{number}"))
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def _item_from_record(record: object, where: str, default_id: str) -> Item:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with question, choices and answer")
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of non-empty strings")
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LABEL_SETS["letters"]:
        answer = LABEL_SETS["letters"].index(answer.upper())
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise ValueError(f"{where}: 'answer' must be the 0-based index of the right choice or its letter, "
                         f"got {record.get('answer')!r}")
    try:
        return Item(question.strip(), tuple(c.strip() for c in choices), answer, str(record.get("id", default_id)))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def stdlib_items(
    root: Path | None = None,
    holdout_fraction: float = 0.02,
    *,
    seed: int = 0,
    max_items: int | None = None,
    n_choices: int = 4,
) -> list[Item]:
    """"Which docstring belongs to this function?" items from held-out stdlib modules.

    A module is held out when ``herd.prepare`` puts its file in the val split at
    ``holdout_fraction`` (the same hash of the file's path as the ``stdlib:prose`` and
    ``stdlib:code`` corpora), so a model pretrained on that data never saw its code or docstrings.
    Each documented public function, method or class of those modules (see
    :func:`herd.data.embedded.sft.module_definitions`) asks for the first sentence of its docstring among
    ``n_choices``: the right one and others drawn from the other held-out definitions. Right
    answers are spread evenly over the positions. ``seed`` fixes the draws; ``max_items`` keeps
    an evenly spread subset. An item's id is the definition's dotted name
    (``json.decoder.JSONDecoder.decode``), as ``herd.curate``'s decontaminate block names it
    (eval set ``stdlib:mcq``).
    """
    pool = list(stdlib_definitions(root, keep=lambda relative: assign_split(relative, holdout_fraction) == "val"))
    summaries = sorted({d.summary for d in pool})
    if len(summaries) < n_choices:
        raise ValueError(f"only {len(summaries)} different docstrings in the stdlib modules held out at "
                         f"holdout_fraction={holdout_fraction}; raise mcq.holdout_fraction")
    rng = random.Random(f"herd.mcq:{seed}")
    if max_items is not None and len(pool) > max_items:
        keep = sorted(rng.sample(range(len(pool)), max_items))
        pool = [pool[i] for i in keep]
    positions = [i % n_choices for i in range(len(pool))]
    rng.shuffle(positions)
    items = []
    for definition, position in zip(pool, positions, strict=True):
        wrong = rng.sample([s for s in summaries if s != definition.summary], n_choices - 1)
        choices = (*wrong[:position], definition.summary, *wrong[position:])
        items.append(Item(f"Which docstring belongs to `{definition.signature}`?", choices, position,
                          definition.name))
    return items


# ------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    max_len: int | None = None,
    progress: Progress | None = None,
) -> list[float]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation given the context.

    Requests that share a context (the choices of one item) share its forward pass: a herd
    :class:`~herd.model.Transformer` runs each context once into a KV cache, repeats the cache
    for its continuations and runs those as one right-padded batch (a causal model's scores at
    real positions do not depend on what follows them). Other modules get each (context +
    continuation) row whole. Only positions that predict continuation tokens go through the output
    head, one chunk of logits at a time (:func:`herd.model.loss.target_logps`); a module without
    ``hidden_states`` and ``output`` gives whole logits, read at those positions. A request longer than ``max_len`` (default: the model's ``max_seq_len``) loses context
    tokens from the left. ``batch_size`` bounds the rows of one forward pass.
    """
    max_len = max_len or getattr(getattr(model, "config", None), "max_seq_len", None) or 1 << 30
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError("a choice's continuation has no tokens")
        groups.setdefault(tuple(context), []).append(index)
    out = [0.0] * len(requests)
    shared = hasattr(model, "new_cache") and hasattr(model, "output")
    contexts = sorted(groups, key=len, reverse=True)  # longest first: the first batch is the largest
    batch: list[tuple[int, ...]] = []
    for context in [*contexts, None]:
        rows = sum(len(groups[c]) for c in batch)
        if batch and (context is None or rows + len(groups[context]) > batch_size):
            work = [(c, [(i, list(requests[i][1])) for i in groups[c]]) for c in batch]
            scores = _shared_context_scores(model, work, max_len) if shared else _whole_row_scores(model, work, max_len)
            for index, value in scores.items():
                out[index] = value
            if progress is not None:
                progress.update(rows)
            batch = []
        if context is not None:
            batch.append(context)
    return out


def _fit(context: Sequence[int], longest: int, max_len: int) -> list[int]:
    """The context cut from the left so that it and a continuation of ``longest`` tokens fit ``max_len`` inputs."""
    keep = max(1, max_len + 1 - longest)
    return list(context[-keep:])


def _shared_context_scores(model, work, max_len: int) -> dict[int, float]:
    """Scores of one batch of (context, [(request index, continuation)]) through one KV cache."""
    device = next(iter(model.parameters())).device
    longest = max(len(cont) for _, conts in work for _, cont in conts)
    contexts = [_fit(context, longest, max_len) for context, _ in work]
    width = max(len(c) for c in contexts)
    prompts = torch.zeros(len(work), width, dtype=torch.long)
    for p, context in enumerate(contexts):
        prompts[p, width - len(context):] = torch.tensor(context)  # left padding
    cache = model.new_cache(len(work), width + longest)
    pad = torch.tensor([width - len(c) for c in contexts])
    if pad.any():
        cache.pad_left(pad)
    last = model.hidden_states(prompts.to(device), cache=cache)[:, -1]  # (prompts, dim): predicts each first token
    owners = [p for p, (_, conts) in enumerate(work) for _ in conts]
    continuations = [cont for _, conts in work for _, cont in conts]
    cache.select(torch.tensor(owners))
    tokens = torch.zeros(len(continuations), longest, dtype=torch.long)
    for r, cont in enumerate(continuations):
        tokens[r, : len(cont)] = torch.tensor(cont)
    tokens = tokens.to(device)
    hidden = model.hidden_states(tokens, cache=cache)  # (rows, longest, dim)
    rows = [r for r, cont in enumerate(continuations) for _ in cont[1:]]
    positions = [j for cont in continuations for j in range(len(cont) - 1)]
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    positions_t = torch.tensor(positions, dtype=torch.long, device=device)
    owners_t = torch.tensor(owners, dtype=torch.long, device=device)
    # the scored positions only: each continuation's first token (from its context's last state), then the rest
    scored = torch.cat([last[owners_t], hidden[rows_t, positions_t]])  # (scored, dim)
    targets = torch.cat([tokens[:, 0], tokens[rows_t, positions_t + 1]])
    picked = target_logps(scored, model.output.weight, targets)  # (scored,), one chunk of logits at a time
    owner = torch.cat([torch.arange(len(continuations), device=device), rows_t])
    sums = torch.zeros(len(continuations), dtype=torch.float64, device=device).index_add_(0, owner, picked.double())
    indices = [i for _, conts in work for i, _ in conts]
    return {i: float(v) for i, v in zip(indices, sums.cpu(), strict=True)}


def _whole_row_scores(model, work, max_len: int) -> dict[int, float]:
    """Scores of one batch of (context, [(request index, continuation)]), each row run whole, right-padded."""
    device = next(iter(model.parameters())).device
    rows = []
    for context, conts in work:
        for index, cont in conts:
            rows.append((index, [*_fit(context, len(cont), max_len), *cont], len(cont)))
    width = max(len(row) for _, row, _ in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    picked_rows, picked_positions = [], []
    for b, (_, row, n_cont) in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row)
        first = len(row) - n_cont - 1  # input position that predicts the first continuation token
        picked_rows += [b] * n_cont
        picked_positions += range(first, first + n_cont)
    tokens = tokens.to(device)
    rows_t = torch.tensor(picked_rows, dtype=torch.long, device=device)
    positions_t = torch.tensor(picked_positions, dtype=torch.long, device=device)
    targets = tokens[rows_t, positions_t + 1]
    if hasattr(model, "hidden_states") and hasattr(model, "output"):  # the head at the scored positions only
        picked = target_logps(model.hidden_states(tokens[:, :-1])[rows_t, positions_t], model.output.weight, targets)
    else:  # a module that only gives logits
        logits = model(tokens[:, :-1])[rows_t, positions_t]  # (picked, vocab)
        picked = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, rows_t, picked.double())
    return {index: float(v) for (index, _, _), v in zip(rows, sums.cpu(), strict=True)}


Scorer = Callable[[Sequence[tuple[Sequence[int], Sequence[int]]]], list[float]]


@dataclass
class MCQResult:
    """Per normalisation, which items each variant got right: ``correct[norm]`` is (variants, items) bool."""

    name: str
    variants: list[Variant]
    correct: dict[str, np.ndarray]
    choice_counts: np.ndarray  # (items,) number of choices of each item

    @property
    def chance(self) -> float:
        """The accuracy of guessing uniformly: the mean of 1 / number of choices."""
        return float((1.0 / self.choice_counts).mean())

    @property
    def n_items(self) -> int:
        """Items per variant."""
        return int(next(iter(self.correct.values())).shape[1])

    def accuracy(self, normalisation: str) -> np.ndarray:
        """Accuracy of each variant, in the order of :attr:`variants`."""
        return self.correct[normalisation].mean(axis=1)

    def spread(self, normalisation: str, axis: str | None = None) -> dict[str, float]:
        """Mean, std (population), min and max of the variants' accuracies: all of them, or one axis
        (its variants and the base)."""
        accuracy = self.accuracy(normalisation)
        chosen = [i for i, v in enumerate(self.variants) if axis is None or v.axis in ("base", axis)]
        values = accuracy[chosen]
        return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
                "max": float(values.max())}

    def metrics(self) -> list[tuple[str, float, int]]:
        """(metric, value, n) rows for results.json: the spread over all variants and per axis, and
        every variant's accuracy, for each normalisation."""
        rows = []
        for norm in NORMALISATIONS:
            for stat, value in self.spread(norm).items():
                rows.append((f"accuracy_{norm}/{stat}", value, self.n_items * len(self.variants)))
            for axis in AXES:
                if any(v.axis == axis for v in self.variants):
                    for stat, value in self.spread(norm, axis).items():
                        rows.append((f"accuracy_{norm}/{axis}.{stat}", value, self.n_items))
            for variant, value in zip(self.variants, self.accuracy(norm), strict=True):
                rows.append((f"accuracy_{norm}/{variant.name}", float(value), self.n_items))
        return rows

    def table(self) -> str:
        """Accuracy per variant (rows) and normalisation (columns), then the spread lines."""
        width = max(len(v.name) for v in self.variants) + 2
        lines = [f"{'variant':<{width}}" + "".join(f"{n:>11}" for n in NORMALISATIONS)]
        accuracies = {n: self.accuracy(n) for n in NORMALISATIONS}
        for i, variant in enumerate(self.variants):
            lines.append(f"{variant.name:<{width}}" + "".join(f"{accuracies[n][i]:>11.3f}" for n in NORMALISATIONS))
        for stat in ("mean", "std", "min", "max"):
            lines.append(f"{stat:<{width}}" + "".join(f"{self.spread(n)[stat]:>11.3f}" for n in NORMALISATIONS))
        return "\n".join(lines)


def evaluate_mcq(
    score: Scorer,
    tokenizer,
    items: Sequence[Item],
    variants: Sequence[Variant],
    name: str = "mcq",
) -> MCQResult:
    """Score every item under every variant with ``score`` (e.g. :func:`continuation_logprobs` bound to a model).

    ``tokenizer`` needs ``encode`` and ``bos_id``. Identical (context, continuation) requests are
    scored once.
    """
    if not items:
        raise ValueError("no multiple-choice items to evaluate")
    requests: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    layout = []  # per variant, per item: (answer, [(request index, characters)])
    for variant in variants:
        per_item = []
        for item in items:
            shown = variant.apply(item)
            prompt, continuations = render(shown, variant.format, variant.labels)
            context = tuple(tokenizer.with_bos(tokenizer.encode(prompt)))
            choices = []
            for text in continuations:
                key = (context, tuple(tokenizer.encode(text)))
                choices.append((requests.setdefault(key, len(requests)), len(text)))
            per_item.append((shown.answer, choices))
        layout.append(per_item)
    keys = list(requests)
    scores = score(keys)
    correct = {norm: np.zeros((len(variants), len(items)), dtype=bool) for norm in NORMALISATIONS}
    for v, per_item in enumerate(layout):
        for i, (answer, choices) in enumerate(per_item):
            raw = np.array([scores[r] for r, _ in choices])
            tokens = np.array([len(keys[r][1]) for r, _ in choices])
            chars = np.array([c for _, c in choices])
            for norm, values in (("raw", raw), ("per_token", raw / tokens), ("per_char", raw / chars)):
                correct[norm][v, i] = int(np.argmax(values)) == answer  # argmax: the earlier choice on ties
    return MCQResult(name, list(variants), correct, np.array([len(item.choices) for item in items]))
