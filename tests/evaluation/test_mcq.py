"""Multiple-choice scoring: hand-computed choice log-likelihoods, permutations, label bias, stdlib items."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from herd.data.embedded.corpus import stdlib_dir, stdlib_files
from herd.data.embedded.sft import module_definitions
from herd.data.kinds import assign_split
from herd.data.tokenizer import train_tokenizer
from herd.evaluation.mcq import (
    NORMALISATIONS,
    Item,
    continuation_logprobs,
    evaluate_mcq,
    load_items,
    render,
    robustness_variants,
    stdlib_items,
)
from herd.model import ModelConfig, Transformer

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima", "mike", "november", "oscar", "papa"]


@pytest.fixture(scope="module")
def tokenizer():
    text = [f"Question: which word is number {i}? Answer: {' '.join(WORDS[i % 16:] + WORDS[:i % 16])} (A) 1. B)"
            for i in range(200)]
    return train_tokenizer(text, vocab_size=600)


def items(count: int = 8) -> list[Item]:
    """Items with distinct one-word choices; right answers spread evenly over the 4 positions."""
    out = []
    for i in range(count):
        choices = tuple(WORDS[(i + k) % 16] for k in range(4))
        out.append(Item(f"Which word is number {i}?", choices, i % 4, f"item{i}"))
    return out


def hand_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """log p(continuation | bos + prompt), one unpadded sequence, summed in float64."""
    context = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    target = tokenizer.encode(continuation)
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1])[0].double(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + k, token]) for k, token in enumerate(target))


class WholeRows(torch.nn.Module):
    """The model behind a plain forward (no KV cache, no output head of its own)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, tokens):
        return self.inner(tokens)


def test_choice_log_likelihoods_match_a_hand_computation(tokenizer):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=tokenizer.vocab_size,
                                    multiple_of=16)).eval()
    variants = robustness_variants(["question_answer", "plain", "inline"], ["letters", "numbers", "none"], 4)
    some = items(4)
    requests, expected, hand = [], [], {}
    for variant in variants:
        for item in some:
            prompt, continuations = render(variant.apply(item), variant.format, variant.labels)
            for text in continuations:
                requests.append(([tokenizer.bos_id, *tokenizer.encode(prompt)], tokenizer.encode(text)))
                if (prompt, text) not in hand:
                    hand[prompt, text] = hand_logprob(model, tokenizer, prompt, text)
                expected.append(hand[prompt, text])
    for batch_size in (1, 9, 64):  # one context per batch, or several of different lengths (left-padded)
        shared = continuation_logprobs(model, requests, batch_size=batch_size)  # contexts through one KV cache
        assert shared == pytest.approx(expected, abs=2e-4)
    whole = continuation_logprobs(WholeRows(model), requests, batch_size=9)  # rows run whole, right-padded
    assert whole == pytest.approx(expected, abs=2e-4)

    # The verdicts follow the hand scores under each normalisation.
    result = evaluate_mcq(lambda reqs: continuation_logprobs(model, reqs, batch_size=7), tokenizer, some, variants)
    for v, variant in enumerate(variants):
        for i, item in enumerate(some):
            shown = variant.apply(item)
            prompt, continuations = render(shown, variant.format, variant.labels)
            raw = np.array([hand[prompt, text] for text in continuations])
            per_token = raw / np.array([len(tokenizer.encode(text)) for text in continuations])
            per_char = raw / np.array([len(text) for text in continuations])
            for norm, values in zip(NORMALISATIONS, (raw, per_token, per_char), strict=True):
                assert result.correct[norm][v, i] == (int(np.argmax(values)) == shown.answer)


def test_permutations_move_the_choices_and_track_the_answer():
    item = Item("Which?", ("right", "w1", "w2", "w3"), 0)
    for order in itertools.permutations(range(4)):
        permuted = item.permuted(order)
        assert list(permuted.choices) == [item.choices[i] for i in order]
        assert permuted.choices[permuted.answer] == "right"
        assert sorted(permuted.choices) == sorted(item.choices)
    for position in range(4):
        moved = item.answer_at(position)
        assert moved.answer == position and moved.choices[position] == "right"
        assert [c for c in moved.choices if c != "right"] == ["w1", "w2", "w3"]  # the others keep their order
    with pytest.raises(ValueError, match="not a permutation"):
        item.permuted([0, 0, 1, 2])


def test_order_variants_put_the_answer_at_each_listed_position():
    item = Item("Which?", ("w1", "w2", "right", "w3"), 2)
    variants = [v for v in robustness_variants(["question_answer"], ["letters"], 4) if v.axis == "order"]
    assert [v.name for v in variants] == [f"order=answer@{k}" for k in range(1, 5)]
    for k, variant in enumerate(variants):
        shown = variant.apply(item)
        prompt, continuations = render(shown, variant.format, variant.labels)
        lines = prompt.splitlines()[1:5]  # the listed choices
        assert lines[k] == f"{'ABCD'[k]}. right" and continuations[shown.answer] == f" {'ABCD'[k]}. right"


def test_label_sets_and_formats_render_as_documented():
    item = Item("Q?", ("x", "y"), 1)
    assert render(item, "question_answer", "numbers") == ("Question: Q?\n1. x\n2. y\nAnswer:", [" 1. x", " 2. y"])
    assert render(item, "plain", "none") == ("Q?\n\n* x\n* y\n\nThe answer is", [" x", " y"])
    assert render(item, "inline", "letters") == ("Q: Q? Options: A) x | B) y A:", [" A) x", " B) y"])
    with pytest.raises(ValueError, match="not a prompt format"):
        robustness_variants(["qa"], ["letters"], 2)


def first_listed_scorer(tokenizer):
    """A 'model' that always answers A: it gives the highest score to the choice listed first in the prompt."""

    def score(requests):
        out = []
        for context, continuation in requests:
            prompt, text = tokenizer.decode(context[1:]), tokenizer.decode(continuation)
            word = next(w for w in WORDS if text.endswith(w))
            listed = sorted(prompt.index(w) for w in WORDS if w in prompt)  # where the choices are listed
            out.append(-1000.0 * listed.index(prompt.index(word)))  # 0 for the first listed, < 0 for the others
        return out

    return score


def test_a_model_that_always_answers_a_gets_chance_accuracy_with_a_large_spread(tokenizer):
    variants = robustness_variants(["question_answer", "plain", "inline"], ["letters", "numbers", "none"], 4)
    result = evaluate_mcq(first_listed_scorer(tokenizer), tokenizer, items(16), variants)
    assert result.chance == 0.25
    for norm in NORMALISATIONS:
        accuracy = dict(zip([v.name for v in variants], result.accuracy(norm), strict=True))
        assert accuracy["order=answer@1"] == 1.0
        assert accuracy["order=answer@2"] == accuracy["order=answer@3"] == accuracy["order=answer@4"] == 0.0
        assert accuracy["base"] == accuracy["labels=none"] == accuracy["format=plain"] == 0.25  # answers spread evenly
        overall = result.spread(norm)
        assert overall["mean"] == pytest.approx(0.25)
        # 9 variants: 1 (answer@1), 0, 0, 0 (answer@2..4) and 0.25 for the other five
        assert overall["min"] == 0.0 and overall["max"] == 1.0
        assert overall["std"] == pytest.approx(math.sqrt((0.75**2 + 3 * 0.25**2) / 9))
        assert result.spread(norm, "order")["std"] > 0.35
        assert result.spread(norm, "labels")["std"] == 0.0  # the bias is positional, whatever the labels
    rows = {metric: value for metric, value, _ in result.metrics()}
    assert rows["accuracy_raw/mean"] == pytest.approx(0.25) and rows["accuracy_per_char/order.max"] == 1.0


def test_an_oracle_scores_one_on_every_variant(tokenizer):
    some = items(8)

    def oracle(requests):  # reads the item's number off the question and knows its answer
        out = []
        for context, continuation in requests:
            item = some[int(re.search(r"number (\d+)", tokenizer.decode(context)).group(1))]
            out.append(0.0 if tokenizer.decode(continuation).endswith(item.choices[item.answer]) else -5.0)
        return out

    variants = robustness_variants(["question_answer", "plain"], ["letters", "none"], 4)
    result = evaluate_mcq(oracle, tokenizer, some, variants)
    for norm in NORMALISATIONS:
        assert result.spread(norm) == {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}


def test_stdlib_items_come_from_held_out_modules():
    found = stdlib_items(holdout_fraction=0.05, seed=0)
    assert len(found) > 50
    held_out = {}
    root = stdlib_dir()
    for path in stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        module = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        if assign_split(relative, 0.05) == "val":
            held_out[module] = {d.qualname: d.summary for d in module_definitions(path.read_bytes(), module)}
    positions = Counter()
    for item in found:
        module = next(m for m in held_out if item.id.startswith(m + ".") and item.id[len(m) + 1:] in held_out[m])
        summary = held_out[module][item.id[len(module) + 1:]]
        assert item.choices[item.answer] == summary  # the right choice is the definition's own docstring
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.question.startswith("Which docstring belongs to `")
        positions[item.answer] += 1
    assert max(positions.values()) - min(positions.values()) <= 1  # right answers spread evenly
    assert stdlib_items(holdout_fraction=0.05, seed=0) == found  # deterministic
    subset = stdlib_items(holdout_fraction=0.05, seed=0, max_items=10)
    assert len(subset) == 10 and {i.id for i in subset} < {i.id for i in found}
    assert len(stdlib_items(holdout_fraction=0.02)) < len(found)  # fewer modules held out


def test_jsonl_items_are_read_and_bad_lines_named(tmp_path):
    good = tmp_path / "items.jsonl"
    good.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}) + "\n\n"
                    + json.dumps({"question": "Sky?", "choices": ["blue", "green", "red"], "answer": "A"}) + "\n")
    loaded = load_items(good)
    assert [(i.question, i.choices, i.answer) for i in loaded] == [("2+2?", ("3", "4"), 1),
                                                                    ("Sky?", ("blue", "green", "red"), 0)]
    assert [i.id for i in loaded] == ["items.jsonl:1", "items.jsonl:3"]   # the file's name and line
    for line, message in [({"question": "q", "choices": ["a"], "answer": 0}, "at least 2 choices"),
                          ({"question": "q", "choices": ["a", "b"], "answer": 2}, "not the index"),
                          ({"question": "q", "choices": ["a", "a"], "answer": 0}, "not all different"),
                          ({"choices": ["a", "b"], "answer": 0}, "'question'"),
                          ({"question": "q", "choices": ["a", "b"], "answer": True}, "'answer'")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}) + "\n" + json.dumps(line))
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            load_items(bad)
    with pytest.raises(FileNotFoundError, match="mcq.items"):
        load_items(tmp_path / "missing.jsonl")


def test_long_contexts_lose_tokens_from_the_left(tokenizer):
    torch.manual_seed(2)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tokenizer.vocab_size, max_seq_len=16,
                                    multiple_of=16)).eval()
    context, continuation = list(range(5, 45)), [7, 8, 9]
    kept = (context + continuation)[-17:]  # 16 input positions
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([kept[:-1]]))[0].double(), dim=-1)
    expected = sum(float(logprobs[13 + k, token]) for k, token in enumerate(continuation))
    [shared] = continuation_logprobs(model, [(context, continuation)])
    [whole] = continuation_logprobs(WholeRows(model), [(context, continuation)], max_len=16)
    assert math.isclose(shared, expected, abs_tol=1e-4) and math.isclose(whole, expected, abs_tol=1e-4)
