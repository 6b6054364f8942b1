"""python -m herd.evaluate: the needle-only invocation as before, and the harness of tasks, results and compare."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers.training import TRAIN_VOCAB
from herd.data.tokenizer import Tokenizer
from herd.evaluate import cli, evaluate, evaluate_needle, report, write_outputs
from herd.evaluation.results import Results, load_results
from herd.interop import hf
from herd.model import ModelConfig, Transformer
from herd.presets import config_dir


def exported_model(tmp_path, prepared_corpus):
    model_dir = tmp_path / "model"
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TRAIN_VOCAB))
    hf.save(model, model_dir, tokenizer=Tokenizer.load(prepared_corpus / "tokenizer"))
    return model_dir


def test_needle_evaluation_of_an_exported_model(tmp_path, prepared_corpus):
    model_dir = exported_model(tmp_path, prepared_corpus)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_dir={model_dir}", f"data_dir={prepared_corpus}",
                                             "lengths=[128,256]", "depths=[0.0,1.0]", "trials=2"])
    result = evaluate_needle(cfg)
    assert result.accuracy.shape == (2, 2) and result.lengths == [128, 256]
    assert result.mean <= 0.25  # an untrained model does not retrieve 5-digit keys


def test_needle_evaluation_with_fp8_feed_forward_layers(tmp_path, prepared_corpus):
    model_dir = tmp_path / "model"
    model = Transformer(ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=TRAIN_VOCAB))
    hf.save(model, model_dir, tokenizer=Tokenizer.load(prepared_corpus / "tokenizer"))
    overrides = [f"model_dir={model_dir}", f"data_dir={prepared_corpus}", "lengths=[128]", "depths=[0.5]",
                 "trials=1"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*overrides, "quantize=fp8_rowwise"])
        bad = compose("evaluate", overrides=[*overrides, "quantize=nf4"])
    assert evaluate_needle(cfg).accuracy.shape == (1, 1)
    with pytest.raises(ValueError, match="quantize='nf4' is not a quantization method"):
        evaluate_needle(bad)


def test_command_line_writes_the_table(tmp_path, prepared_corpus):
    # The needle-only harness's keys, as before; the default tasks (perplexity, needle, mcq) run on small settings.
    model_dir = exported_model(tmp_path, prepared_corpus)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "herd.evaluate", f"model_dir={model_dir}", f"data_dir={prepared_corpus}",
                          "lengths=[128]", "depths=[0.5]", "trials=1", f"hydra.run.dir={run}",
                          "perplexity.sources=[prose]", "mcq.max_items=4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((run / "needle.json").read_text())
    assert saved["lengths"] == [128] and np.array(saved["accuracy"]).shape == (1, 1)
    assert "depth \\ length" in out.stdout
    tasks = {row["task"] for row in load_results(run / "results.json")["results"]}
    assert tasks == {"perplexity", "needle", "mcq/stdlib_docstrings"}
    assert "mcq stdlib_docstrings: 4 items x 9 variants" in out.stdout


def test_a_missing_model_is_an_error_the_command_line_reports(tmp_path):
    # main() prints FileNotFoundError and ValueError (CheckpointError is one) and exits with status 2
    with pytest.raises((FileNotFoundError, ValueError), match="missing"):
        evaluate(compose_evaluate(f"model_dir={tmp_path / 'missing'}", "tasks=[mcq]", "mcq.max_items=2"))


# ------------------------------------------------------------------------------------- the harness


def compose_evaluate(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def mcq_file(tmp_path):
    path = tmp_path / "items.jsonl"
    lines = [{"question": f"Which number follows {i}?", "choices": [str(i + 1), str(i + 5), str(i + 9)], "answer": 0}
             for i in range(6)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_harness_writes_every_task_to_results_json_and_tensorboard(tmp_path, prepared_corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir = exported_model(tmp_path, prepared_corpus)
    cfg = compose_evaluate(f"model_dir={model_dir}", f"data_dir={prepared_corpus}", "tasks=[perplexity,needle,mcq]",
                           "perplexity.sources=[prose]", "lengths=[128]", "depths=[0.5]", "trials=1", f"mcq.items={mcq_file(tmp_path)}",
                           "mcq.formats=[question_answer,plain]", "mcq.labels=[letters,none]", "seed=5")
    results, details = evaluate(cfg)
    write_outputs(tmp_path / "run", cfg, results, details)
    saved = load_results(tmp_path / "run" / "results.json")
    rows = {(r["task"], r["metric"]): r for r in saved["results"]}
    assert all(r["seed"] == 5 and r["model"] == str(model_dir) for r in saved["results"])
    for source in ("prose", "all"):
        loss = rows["perplexity", f"loss/{source}"]
        assert rows["perplexity", f"perplexity/{source}"]["value"] == pytest.approx(math.exp(loss["value"]))
        assert loss["n"] == details["perplexity"][source].tokens > 0
    assert rows["needle", "accuracy/mean"]["n"] == 1
    # 6 items x (base, answer@1..3, one other format, one other label set) = 6 variants
    assert rows["mcq/items", "accuracy_raw/mean"]["n"] == 36 and rows["mcq/items", "accuracy_raw/base"]["n"] == 6
    assert {"accuracy_per_token/order.std", "accuracy_per_char/labels=none"} <= {m for _, m in rows}
    assert (tmp_path / "run" / "needle.json").is_file()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "perplexity/loss/all" in events.Tags()["scalars"]
    assert "mcq accuracy" not in report(cfg, results, details) and "mcq items: 6 items x 6 variants" in report(
        cfg, results, details)


def test_reward_accuracy_is_skipped_with_the_reason_without_a_reward_model(tmp_path, monkeypatch):
    cfg = compose_evaluate(f"model_dir={tmp_path / 'never_loaded'}", "tasks=[reward_accuracy]")
    results, _ = evaluate(cfg)
    assert results.rows == [] and "no reward model given" in results.skipped[0]["reason"]


class TokenSumReward(torch.nn.Module):
    """Test-only reward model: the reward at a position is the running sum of (token id mod 7)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        return (tokens % 7).float().cumsum(dim=1)


def test_reward_accuracy_matches_a_hand_count(tmp_path, prepared_corpus, monkeypatch):
    from herd.data.chat import encode_dialog

    tokenizer = Tokenizer.load(prepared_corpus / "tokenizer")
    monkeypatch.setattr(hf, "load_reward_model", lambda path, **_: TokenSumReward())
    pairs = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"Say {i}", "chosen": "no " * (i % 3 + 1), "rejected": "ok " * (i % 2 + 1)} for i in range(9)]
    pairs.write_text("\n".join(json.dumps(r) for r in records))
    cfg = compose_evaluate(f"model_dir={tmp_path / 'never_loaded'}", "tasks=[reward_accuracy]",
                           f"tokenizer={prepared_corpus / 'tokenizer'}", f"reward_model={tmp_path}",
                           f"reward_accuracy.pairs={pairs}")
    results, details = evaluate(cfg)

    def reward(prompt, response):
        ids = encode_dialog(tokenizer, [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": response}]).ids
        return sum(i % 7 for i in ids)

    wins = [reward(r["prompt"], r["chosen"]) > reward(r["prompt"], r["rejected"]) for r in records]
    assert 0 < sum(wins) < len(wins)
    assert results.value("reward_accuracy", "accuracy") == pytest.approx(sum(wins) / len(wins))
    assert details["reward_accuracy"]["n"] == 9


def test_compare_prints_results_side_by_side(tmp_path, capsys):
    paths = []
    for name, loss in (("a", 3.0), ("b", 2.0)):
        results = Results(f"runs/{name}/export", 0)
        results.add("perplexity", "loss/all", loss, 100)
        paths.append(str(results.write_json(tmp_path / name / "results.json")))
    cli(["--compare", *paths])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "a/export", "b/export", "difference"]
    assert lines[2].split() == ["perplexity", "loss/all", "3.0000", "2.0000", "-1.0000"]
    with pytest.raises(SystemExit) as exit_info:
        cli(["--compare", paths[0], str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "missing.json does not exist" in capsys.readouterr().err


def test_unknown_tasks_are_refused_with_the_list():
    with pytest.raises(ValueError, match=r"\['perplexity', 'needle', 'mcq', 'reward_accuracy'\]"):
        evaluate(compose_evaluate("model_dir=x", "tasks=[perplexity,ppl]"))


def test_reward_accuracy_of_a_saved_reward_model_matches_rewards_computed_alone(tmp_path, prepared_corpus):
    from herd.data.chat import encode_dialog

    tokenizer = Tokenizer.load(prepared_corpus / "tokenizer")
    backbone = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=TRAIN_VOCAB, multiple_of=16))
    head = torch.randn(1, 32)
    directory = hf.save_reward_model(backbone, head, tmp_path / "reward", tokenizer=tokenizer)
    records = [{"prompt": f"Name {i}", "chosen": "one two " * (i % 4 + 1), "rejected": f"x{i} y"} for i in range(8)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in records))
    cfg = compose_evaluate(f"model_dir={tmp_path / 'never_loaded'}", "tasks=[reward_accuracy]",
                           f"reward_model={directory}", f"reward_accuracy.pairs={pairs}")
    results, details = evaluate(cfg)

    def reward(prompt, response):  # one unpadded row, the head on the last token's final hidden state
        ids = encode_dialog(tokenizer, [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": response}]).ids
        with torch.no_grad():
            return float(backbone.hidden_states(torch.tensor([ids]))[0, -1] @ head[0])

    margins = [reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"]) for r in records]
    assert results.value("reward_accuracy", "accuracy") == pytest.approx(sum(m > 0 for m in margins) / 8)
    assert results.value("reward_accuracy", "margin") == pytest.approx(sum(margins) / 8, abs=1e-4)
    assert details["reward_accuracy"]["n"] == 8


# ------------------------------------------------------------------------------ exclude=contaminated.jsonl


def quiz_file(tmp_path):
    """Six items with questions long enough for the 8-gram decontamination (ids quiz.jsonl:1..6)."""
    from helpers.curation import random_text

    path = tmp_path / "quiz.jsonl"
    lines = [{"question": f"{random_text(100 + i, 12)} number {i}?", "choices": [f"{random_text(200 + i, 3)} {k}"
                                                                                 for k in range(3)], "answer": i % 3}
             for i in range(6)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_items_decontamination_lists_are_left_out_and_the_rest_scored_as_before(tmp_path, prepared_corpus,
                                                                                  monkeypatch):
    from helpers.curation import documents, random_text, run_block  # the curate extra (datatrove)
    from herd.curation.decontaminate import Decontaminate
    from herd.evaluation import mcq as mcq_module

    items = quiz_file(tmp_path)
    planted = json.loads(items.read_text().splitlines()[2])
    training = documents([random_text(seed, 100) for seed in range(5)]
                         + [f"Seen on a forum: {planted['question']} {' '.join(planted['choices'])} thanks"])
    block = Decontaminate("decontaminate", {"eval_sets": {"quiz": {"input": str(items),
                                                                   "fields": ["question", "choices"]}}})
    run_block(block, training, tmp_path / "work")
    listed = block.write_list(tmp_path / "contaminated.jsonl")
    assert [json.loads(line)["id"] for line in listed.read_text().splitlines()] == ["quiz.jsonl:3"]

    scored = []   # {(context, continuation): score} of each run
    original = mcq_module.continuation_logprobs

    def spy(model, requests, *args, **kwargs):
        scores = original(model, requests, *args, **kwargs)
        scored[-1].update(zip(requests, scores, strict=True))
        return scores

    monkeypatch.setattr(mcq_module, "continuation_logprobs", spy)
    model_dir = exported_model(tmp_path, prepared_corpus)
    common = [f"model_dir={model_dir}", "tasks=[mcq]", f"mcq.items={items}", "mcq.formats=[question_answer]",
              "mcq.labels=[letters]", "batch_size=1"]   # one item a forward pass: its scores do not depend on the others
    runs = []
    for extra in ([], [f"exclude={listed}"]):
        scored.append({})
        cfg = compose_evaluate(*common, *extra)
        runs.append((cfg, *evaluate(cfg)))
    (_, before, found_before), (cfg, after, found_after) = runs
    assert found_before["mcq"].n_items == 6 and found_after["mcq"].n_items == 5
    tokenizer = Tokenizer.load(model_dir)
    contexts = {tokenizer.decode(list(context)) for context, _ in scored[1]}
    assert not any(planted["question"] in text for text in contexts)
    assert all(scored[1][request] == scored[0][request] for request in scored[1])   # the rest, scored as before
    planted_requests = sum(planted["question"] in tokenizer.decode(list(context)) for context, _ in scored[0])
    assert planted_requests > 0 and len(scored[0]) - len(scored[1]) == planted_requests
    for norm in ("raw", "per_token", "per_char"):
        assert (found_after["mcq"].correct[norm] == np.delete(found_before["mcq"].correct[norm], 2, axis=1)).all()
    row = next(r for r in after.rows if r.metric == "excluded")
    assert (row.task, row.value, row.n) == ("mcq/quiz", 1, 6)
    assert not any(r.metric == "excluded" for r in before.rows)
    assert f"excluded from mcq/quiz: 1 of 6 (listed in {listed})" in report(cfg, after, found_after)


def test_excluded_reward_pairs_are_left_out(tmp_path, prepared_corpus, monkeypatch):
    monkeypatch.setattr(hf, "load_reward_model", lambda path, **_: TokenSumReward())
    pairs = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"Say {i}", "chosen": "no " * (i % 3 + 1), "rejected": "ok " * (i % 2 + 1)} for i in range(6)]
    records[1]["id"] = "p1"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    listed = tmp_path / "contaminated.jsonl"
    listed.write_text(json.dumps({"set": "pairs", "id": "p1"}) + "\n" + json.dumps({"set": "pairs", "id": "pairs.jsonl:4"})
                      + "\n" + json.dumps({"set": "other", "id": "elsewhere"}) + "\n")
    common = [f"model_dir={tmp_path / 'never_loaded'}", "tasks=[reward_accuracy]", f"tokenizer={prepared_corpus / 'tokenizer'}",
              f"reward_model={tmp_path}"]
    whole, _ = evaluate(compose_evaluate(*common, f"reward_accuracy.pairs={pairs}"))
    results, details = evaluate(compose_evaluate(*common, f"reward_accuracy.pairs={pairs}", f"exclude={listed}"))
    assert details["reward_accuracy"]["n"] == 4 and results.value("reward_accuracy", "excluded") == 2
    rest = tmp_path / "rest.jsonl"
    rest.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(records) if i not in (1, 3)))
    alone, _ = evaluate(compose_evaluate(*common, f"reward_accuracy.pairs={rest}"))
    assert results.value("reward_accuracy", "accuracy") == alone.value("reward_accuracy", "accuracy")
    assert whole.value("reward_accuracy", "accuracy") != alone.value("reward_accuracy", "accuracy")


def test_a_missing_or_malformed_exclusion_list_stops_before_the_model_loads(tmp_path):
    bad = tmp_path / "contaminated.jsonl"
    bad.write_text('{"set": "quiz", "id": "a"}\n{"set": "quiz"}\n')
    for path, error, problem in ((tmp_path / "missing.jsonl", FileNotFoundError, "no such file"),
                                 (bad, ValueError, ":2: expected an object with a string 'id'")):
        with pytest.raises(error, match=f"^exclude={path}.*{problem}.*or exclude=null$"):
            evaluate(compose_evaluate(f"model_dir={tmp_path / 'never_loaded'}", "tasks=[mcq]", f"exclude={path}"))


def test_a_list_of_every_item_is_refused(tmp_path, prepared_corpus):
    items = quiz_file(tmp_path)
    listed = tmp_path / "contaminated.jsonl"
    listed.write_text("".join(json.dumps({"set": "quiz", "id": f"quiz.jsonl:{n}"}) + "\n" for n in range(1, 7)))
    cfg = compose_evaluate(f"model_dir={exported_model(tmp_path, prepared_corpus)}", "tasks=[mcq]",
                           f"mcq.items={items}", f"exclude={listed}")
    with pytest.raises(ValueError, match="lists every one of the 6 items of mcq/quiz: nothing is left"):
        evaluate(cfg)
