"""python -m herd.rejection_sample: the argmax-reward answer is kept, pairs are best vs worst, ranks merge."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from herd.data.chat import Llama3Format
from herd.data.kinds.dialog import jsonl_dialogs
from herd.data.kinds.preference import jsonl_rankings
from herd.data.tokenizer import Tokenizer, train_tokenizer
from herd.evaluation.answers import token_f1
from herd.inference import score_dialogs
from herd.interop import hf
from herd.model import ModelConfig, RewardModel, Transformer
from herd.presets import config_dir
from herd.rejection_sample import (
    Prompt,
    RejectionSampleError,
    Result,
    Sample,
    describe,
    read_prompts,
    run,
    select,
    take,
)

PROMPTS = [
    {"messages": [{"role": "user", "content": "What does textwrap.dedent do?"},
                  {"role": "assistant", "content": "Remove any common leading whitespace."}], "group": "textwrap"},
    {"prompt": "Wrap a paragraph.", "id": "wrap"},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Fill it?"}]},
    {"prompt": [{"role": "user", "content": "Indent every line."}], "group": "textwrap"},
    {"prompt": "Shorten a line to a width."},
]


def stub_reward(text: str) -> float:
    """A known function of the answer's text: its sha256 read as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big") / 2**48


def stub_scorer(dialogs):
    assert all(d[-1]["role"] == "assistant" and d[-2]["role"] == "user" for d in dialogs)
    return [stub_reward(d[-1]["content"]) for d in dialogs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A random 2-layer policy with a 600-id herd tokenizer, and a jsonl of 5 prompts."""
    root = tmp_path_factory.mktemp("rejection")
    train_tokenizer([inspect.getsource(textwrap)], vocab_size=600).save(root / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=640, multiple_of=16, max_seq_len=128)
    policy = hf.save(Transformer(config), root / "policy", tokenizer=root / "tokenizer")
    reward = RewardModel(Transformer(config))
    torch.nn.init.normal_(reward.head.weight)
    hf.save_reward_model(reward.backbone, reward.head.weight, root / "reward", tokenizer=root / "tokenizer")
    train_tokenizer([inspect.getsource(json.decoder)], vocab_size=600).save(root / "other_tokenizer")
    hf.save_reward_model(reward.backbone, reward.head.weight, root / "other_reward", tokenizer=root / "other_tokenizer")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {"policy": policy, "prompts": prompts, "root": root}


def _cfg(setup, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("rejection_sample", overrides=[
            f"policy={setup['policy']}", "reward_model=unused", f"prompts={setup['prompts']}", f"output_dir={out}",
            "num_samples=5", "max_new_tokens=6", "keep_unfinished=true", "save_samples=true", "progress=false",
            "tensorboard=false", "shuffle=false", "batch_size=2", "score_batch_size=4", *overrides])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_argmax_reward_answer_is_kept_and_the_worst_is_rejected(setup, tmp_path):
    stats = run(_cfg(setup, tmp_path), scorer=stub_scorer)
    samples, sft = _lines(tmp_path / "samples.jsonl"), _lines(tmp_path / "sft.jsonl")
    preferences = _lines(tmp_path / "preferences.jsonl")
    assert [s["id"] for s in samples] == ["prompts.jsonl:1", "wrap", "prompts.jsonl:3", "prompts.jsonl:4",
                                          "prompts.jsonl:5"]
    assert all(len(s["samples"]) == 5 for s in samples)
    bests, everything = [], []
    for line, kept in zip(samples, sft, strict=True):
        texts = [s["content"] for s in line["samples"]]
        usable = [i for i, s in enumerate(line["samples"]) if s["unusable"] is None]
        assert all(line["samples"][i]["reward"] is None for i in set(range(5)) - set(usable))
        rewards = {i: stub_reward(texts[i]) for i in usable}
        assert {i: line["samples"][i]["reward"] for i in usable} == pytest.approx(rewards)
        best = max(usable, key=lambda i: rewards[i])
        assert kept["id"] == line["id"] and kept["messages"][:-1] == line["messages"]
        assert kept["messages"][-1] == {"role": "assistant", "content": texts[best]}
        assert kept.get("group") == line.get("group")
        bests.append(rewards[best])
        everything += rewards.values()
        pair = next(p for p in preferences if p["id"] == line["id"])
        worst = min((i for i in usable if texts[i] != texts[best]), key=lambda i: rewards[i])
        assert pair["prompt"] == line["messages"]
        assert [(r["content"], r["rank"]) for r in pair["responses"]] == [(texts[best], 0), (texts[worst], 1)]
    assert stats["reward"]["mean_best"] == pytest.approx(sum(bests) / len(bests))
    assert stats["reward"]["mean_sample"] == pytest.approx(sum(everything) / len(everything))
    assert stats["reward"]["mean_best"] > stats["reward"]["mean_sample"]
    assert stats["kept"] == {"sft": 5, "preferences": 5, "fraction": 1.0}
    assert "answer_f1" in stats  # the first prompt has a reference answer
    assert json.loads((tmp_path / "stats.json").read_text())["prompts"] == 5
    # the outputs are the dialog and preference formats herd.prepare reads
    assert [d.group for d in jsonl_dialogs(tmp_path / "sft.jsonl")] == ["textwrap", None, None, "textwrap", None]
    rankings = list(jsonl_rankings(tmp_path / "preferences.jsonl"))
    assert [[r.rank for r in ranking.responses] for ranking in rankings] == [[0, 1]] * 5


def test_selection_skips_unfinished_empty_and_tied_answers():
    prompt = Prompt("p", [{"role": "user", "content": "q"}])

    def result(*samples):
        return select(Result(0, prompt, [Sample(t, f, r) for t, f, r in samples]), min_margin=0.0)

    unfinished_best = result(("a", True, 0.1), ("b", False, 0.9), ("c", True, 0.5))
    assert (unfinished_best.best, unfinished_best.worst) == (2, 0)
    tied = result(("a", True, 0.5), ("b", True, 0.5))
    assert (tied.best, tied.worst, tied.skipped) == (0, None, "no_pair")
    same_text = result(("a", True, 0.7), ("a", True, 0.2))
    assert (same_text.best, same_text.worst, same_text.skipped) == (0, None, "no_pair")
    nothing = result(("", True, None), ("x", False, 0.3))
    assert (nothing.best, nothing.skipped) == (None, "no_usable_sample")
    kept = select(Result(0, prompt, [Sample("x", False, 0.3), Sample("y", True, 0.1)]), keep_unfinished=True)
    assert (kept.best, kept.worst) == (0, 1)
    margin = select(Result(0, prompt, [Sample("x", True, 0.3), Sample("y", True, 0.25)]), min_margin=0.1)
    assert (margin.best, margin.worst) == (0, None)


def test_ranks_split_the_prompts_and_rank_zero_merges_them_in_order(setup, tmp_path):
    greedy = ("temperature=0", "num_samples=1")
    single = run(_cfg(setup, tmp_path / "one", *greedy), scorer=stub_scorer)
    assert run(_cfg(setup, tmp_path / "two", *greedy), scorer=stub_scorer, rank=1, world_size=2) is None
    part = _lines(tmp_path / "two" / "parts" / "rank-00001.jsonl")
    assert [r["index"] for r in part] == [1, 3]
    merged = run(_cfg(setup, tmp_path / "two", *greedy), scorer=stub_scorer, rank=0, world_size=2)
    assert not (tmp_path / "two" / "parts").exists()
    assert _lines(tmp_path / "two" / "sft.jsonl") == _lines(tmp_path / "one" / "sft.jsonl")
    assert merged["reward"] == single["reward"] and merged["world_size"] == 2
    assert merged["skipped_prompts"] == {"no_pair": 5}  # one answer per prompt: no pairs
    # an evaluation (one greedy answer per prompt) is described as one, not as a selection that kept no pairs
    text = describe(merged)
    mean = sum(stub_reward(line["messages"][-1]["content"]) for line in _lines(tmp_path / "one" / "sft.jsonl")) / 5
    assert text.splitlines()[0].startswith(f"answered 5 prompts, one answer each: mean reward {mean:.3f} (sd ")
    assert "answer F1 vs references: " in text
    assert not any(word in text for word in ("kept", "pair", "SFT", "skipped"))


def test_a_reward_model_directory_scores_the_answers(setup, tmp_path):
    run(_cfg(setup, tmp_path, f"reward_model={setup['root'] / 'reward'}", "tensorboard=true"))
    model, tokenizer = hf.load_reward_model(setup["root"] / "reward"), Tokenizer.load(setup["policy"])
    for line in _lines(tmp_path / "samples.jsonl"):
        usable = [s for s in line["samples"] if s["unusable"] is None]
        expected = score_dialogs(model, Llama3Format(tokenizer), [[*line["messages"], {"role": "assistant", "content": s["content"]}]
                                                    for s in usable])
        assert [s["reward"] for s in usable] == pytest.approx(expected, abs=1e-5)
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(RejectionSampleError, match="uses another tokenizer than the policy"):
        run(_cfg(setup, tmp_path / "x", f"reward_model={setup['root'] / 'other_reward'}"))


@pytest.mark.slow
def test_prompts_from_stdlib_keep_the_split_and_slices_are_disjoint():
    held_out = read_prompts("stdlib:sft", split="val")
    train = read_prompts("stdlib:sft")
    assert held_out and train and not {p.group for p in held_out} & {p.group for p in train}
    assert all(p.reference and p.messages[-1]["role"] == "user" for p in held_out[:20])
    first, second = take(train, True, 0, 0, 50), take(train, True, 0, 50, 50)
    assert len(first) == len(second) == 50 and not {p.id for p in first} & {p.id for p in second}


def test_bad_options_exit_with_status_2(setup, tmp_path):
    done = subprocess.run([sys.executable, "-m", "herd.rejection_sample", f"policy={setup['policy']}",
                           "reward_model=x", f"output_dir={tmp_path}", "num_samples=0"], capture_output=True, text=True)
    assert done.returncode == 2 and "num_samples=0: give a positive integer" in done.stderr


def test_a_run_that_keeps_nothing_fails_and_says_why(setup, tmp_path):
    with pytest.raises(RejectionSampleError, match=r"0 pairs of 5 prompts, fewer than min_kept=1.* were cut at max_new_tokens=6"):
        run(_cfg(setup, tmp_path, "keep_unfinished=false"), scorer=stub_scorer)
    assert not (tmp_path / "stats.json").exists() and (tmp_path / "samples.jsonl").exists()


def test_judge_answer_f1_ranks_the_answers_by_token_f1_against_the_reference(setup, tmp_path):
    # references made of textwrap's own words, so that the random policy's answers overlap them
    reference = " ".join(inspect.getsource(textwrap).split()[:400])
    prompts = tmp_path / "with_references.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                        {"role": "assistant", "content": reference}]}) + "\n"
                               for i in range(4)))
    cfg = _cfg(setup, tmp_path / "out", f"prompts={prompts}", "judge=answer_f1", "max_new_tokens=12")
    cfg.reward_model = "???"  # not read: the judge needs no reward model
    stats = run(cfg)
    rewards = []
    for line, kept in zip(_lines(tmp_path / "out" / "samples.jsonl"), _lines(tmp_path / "out" / "sft.jsonl"),
                          strict=True):
        usable = [s for s in line["samples"] if s["unusable"] is None]
        f1 = [token_f1(s["content"], reference) for s in usable]
        assert [s["reward"] for s in usable] == pytest.approx(f1)
        assert kept["reward"] == pytest.approx(max(f1))
        rewards += f1
    assert max(rewards) > 0  # the answers share words with the references: the ranking is not all ties
    assert stats["options"]["judge"] == "answer_f1" and stats["options"]["reward_model"] is None
    assert stats["answer_f1"]["mean_best"] == pytest.approx(stats["reward"]["mean_best"])
    # a prompt without a reference answer is refused before anything is sampled
    with pytest.raises(RejectionSampleError, match=r"judge=answer_f1 needs a reference answer for every prompt, "
                                                   r"and 'wrap' has none"):
        run(_cfg(setup, tmp_path / "refused", "judge=answer_f1"))
    assert not (tmp_path / "refused" / "samples.jsonl").exists()
    # the same question with two references: which one an answer is scored against would be a guess
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"id": name, "messages": [{"role": "user", "content": "Same?"},
                                                                  {"role": "assistant", "content": answer}]}) + "\n"
                             for name, answer in (("a", "yes"), ("b", "no"))))
    with pytest.raises(RejectionSampleError, match=r"prompts 'a' and 'b' ask the same question with different "
                                                   r"reference answers"):
        run(_cfg(setup, tmp_path / "twice", f"prompts={twice}", "judge=answer_f1"))
    with pytest.raises(RejectionSampleError, match=r"judge='people': use one of \('reward_model', 'answer_f1'\)"):
        run(_cfg(setup, tmp_path / "bad", "judge=people"))
