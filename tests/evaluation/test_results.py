"""results.json: the schema, the round trip, TensorBoard scalars and the comparison table."""

from __future__ import annotations

import json
import math

import pytest

import herd
from herd.evaluation.batching import bytes_per_token, rows_per_batch
from herd.evaluation.results import ROW_KEYS, SCHEMA, Results, compare_table, load_results
from herd.model import ModelConfig


def sample(model: str, loss: float, accuracy: float | None) -> Results:
    results = Results(model, seed=3)
    results.add("perplexity", "loss/all", loss, 1000)
    if accuracy is not None:
        results.add("mcq/stdlib_docstrings", "accuracy_raw/mean", accuracy, 49)
    results.skip("reward_accuracy", "no reward model given")
    return results


def test_rows_have_the_stable_keys_and_round_trip(tmp_path):
    path = sample("runs/a/export", 2.5, 0.4).write_json(tmp_path / "results.json")
    content = json.loads(path.read_text())
    assert content["schema"] == SCHEMA and content["herd_version"] == herd.__version__
    assert content["skipped"] == [{"task": "reward_accuracy", "reason": "no reward model given"}]
    assert content["results"][0] == {"model": "runs/a/export", "task": "perplexity", "metric": "loss/all",
                                     "value": 2.5, "n": 1000, "seed": 3, "herd_version": herd.__version__}
    assert all(tuple(row) == ROW_KEYS for row in content["results"])
    assert load_results(path)["results"] == content["results"]


def test_non_finite_values_are_written_as_null(tmp_path):
    results = Results("m", 0)
    results.add("perplexity", "loss/empty", math.nan, 0)
    content = json.loads(results.write_json(tmp_path / "r.json").read_text())
    assert content["results"][0]["value"] is None


def test_other_files_are_refused_naming_them(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"lengths": [1]}))
    with pytest.raises(ValueError, match="other.json is not a herd.evaluate results file"):
        load_results(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text(json.dumps({"schema": SCHEMA, "results": [{"task": "x"}]}))
    with pytest.raises(ValueError, match="result 0 lacks"):
        load_results(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        load_results(tmp_path / "missing.json")


def test_compare_table_lines_up_metrics_with_the_difference(tmp_path):
    a = sample("logs/pretrain/runs/a/export", 2.5, 0.40).to_dict()
    b = sample("logs/pretrain/runs/b/export", 2.25, None).to_dict()
    lines = compare_table([a, b]).splitlines()
    assert lines[0].split() == ["task", "metric", "a/export", "b/export", "difference"]
    loss = next(line for line in lines if "loss/all" in line).split()
    assert loss == ["perplexity", "loss/all", "2.5000", "2.2500", "-0.2500"]
    accuracy = next(line for line in lines if "accuracy_raw/mean" in line).split()
    assert accuracy[2:] == ["0.4000", "-", "-"]  # b lacks it
    three = compare_table([a, b, a], names=["x", "y", "z"]).splitlines()
    assert three[0].split() == ["task", "metric", "x", "y", "z"]


def test_tensorboard_gets_one_scalar_per_row(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sample("m", 2.5, 0.4).write_tensorboard(tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["mcq/stdlib_docstrings/accuracy_raw/mean", "perplexity/loss/all"]
    assert events.Scalars("perplexity/loss/all")[0].value == pytest.approx(2.5)


def test_batch_rows_follow_the_documented_memory_rule():
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=16)
    per_token = 4 * (2 * 1000 + 3 * config.ffn_hidden_dim + 8 * 64)
    assert bytes_per_token(config) == per_token
    free = 100 * 512 * per_token  # room for 100 rows of 512 at fraction 1
    assert rows_per_batch(config, 512, free_bytes=free, fraction=1.0, max_rows=1000) == 100
    assert rows_per_batch(config, 512, free_bytes=free, fraction=0.25, max_rows=1000) == 25
    assert rows_per_batch(config, 512, free_bytes=free, fraction=1.0, max_rows=16) == 16
    assert rows_per_batch(config, 512, free_bytes=10, max_rows=16) == 1

