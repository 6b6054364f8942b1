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
