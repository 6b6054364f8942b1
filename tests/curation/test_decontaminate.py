"""Decontamination: 8-gram overlap finds evaluation items planted in the training data."""

from __future__ import annotations

import json

from helpers.curation import documents, random_text, removed_ids, run_block
from herd.curation.decontaminate import Decontaminate

QUESTION = "Which planet in the solar system has the longest day measured against its own year"
ANSWER = "Venus turns so slowly that one of its days lasts longer than one of its years"


def _eval_set(path):
    items = [{"id": "q1", "question": QUESTION, "answer": ANSWER},
             {"id": "q2", "question": "Name the river that flows through the old capital of the northern province",
              "answer": "the long grey river"},
             {"id": "q3", "question": random_text(777, 30), "answer": "yes"}]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def test_eight_gram_overlap_finds_planted_items_and_lists_them(tmp_path):
    eval_file = _eval_set(tmp_path / "eval.jsonl")
    training = [random_text(seed, 150) for seed in range(20)]
    training[4] = f"{random_text(50, 60)} Quiz: {QUESTION.upper()}? Answer: {ANSWER}! {random_text(51, 60)}"
    # 8 words of q2 only: under the 0.5 threshold of its words
    training[9] += " name the river that flows through the old"
    options = {"eval_sets": {"quiz": {"input": eval_file, "fields": ["question", "answer"]}}, "n": 8}
    block = Decontaminate("decontaminate", options)
    verdicts = run_block(block, documents(training), tmp_path / "report")
    assert removed_ids(verdicts) == set()                       # action: report keeps the training data
    assert [(item.id, item.seen_in) for item in block.contaminated] == [("q1", "web/4")]
    assert block.contaminated[0].coverage() == 1.0
    assert block.notes["contaminated"][0].startswith("quiz/q1: 100%")
    partial = next(item for item in block.items if item.id == "q2")
    assert 0.3 < partial.coverage() < 0.5
    lines = block.write_list(tmp_path / "contaminated.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["q1"]

    removing = Decontaminate("decontaminate", {**options, "action": "remove"})
    assert removed_ids(run_block(removing, documents(training), tmp_path / "remove")) == {"web/4"}


def test_stdlib_mcq_items_carry_the_ids_herd_evaluate_gives_them(tmp_path):
    from herd.curation.decontaminate import _eval_items
    from herd.evaluation.mcq import load_items, stdlib_items

    checked = {item.id: item for item in _eval_items("mcq", "stdlib:mcq", ["text"])}
    for item in stdlib_items(holdout_fraction=0.02, max_items=40):
        assert item.choices[item.answer] in checked[item.id].text   # the right answer is part of the item
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text(json.dumps({"question": QUESTION, "choices": ["a", "b"], "answer": 0}) + "\n\n"
                    + json.dumps({"id": "q9", "question": "Why?", "choices": ["a", "b"], "answer": 1}) + "\n")
    found = [item.id for item in _eval_items("quiz", str(quiz), ["question", "choices"])]
    assert found == [item.id for item in load_items(quiz)] == ["quiz.jsonl:1", "q9"]
