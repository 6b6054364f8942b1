"""Scaling laws: the fit recovers known laws, the ladder plans budgets with the throughput formula, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from herd.model import ModelConfig
from herd.scaling import (
    FIT_FILE,
    PLOT_FILE,
    RUN_FILE,
    fit_isoflop,
    fit_runs,
    ladder,
    load_runs,
    main,
    plan_ladder,
    plan_rung,
    train_rung,
    warmup_steps,
)

# The paper's fit (section 3.2.1): N*(C) = 0.29 C^0.53.
A, ALPHA = 0.29, 0.53
B, BETA, CURVATURE = 40.0, 0.05, 0.08


def synthetic_runs(noise: float = 0.0, seed: int = 0) -> list[dict]:
    """IsoFLOP runs whose minima follow N*(C) = A C^alpha and L*(C) = B C^-beta exactly, 7 sizes per budget,
    spread over +-1.5 in ln(tokens) around the optimum, plus Gaussian noise on the losses."""
    rng = np.random.default_rng(seed)
    runs = []
    for budget in np.geomspace(6e18, 1e22, 5):  # the paper's range
        for k, offset in enumerate(np.linspace(-1.5, 1.5, 7)):
            tokens = A * budget**ALPHA * math.exp(offset)
            loss = B * budget ** (-BETA) + CURVATURE * offset**2 + noise * rng.standard_normal()
            runs.append({"name": f"{budget:.3g}-s{k}", "size": f"s{k}", "budget": float(budget), "flops": float(budget),
                         "tokens": tokens, "params": int(budget / (6 * tokens)), "val_loss": loss, "held_out": False})
    return runs


def test_the_fit_recovers_a_and_alpha_from_synthetic_ladders():
    fit = fit_runs(synthetic_runs())
    assert pytest.approx(A, rel=1e-6) == fit.A and fit.alpha == pytest.approx(ALPHA, rel=1e-9)
    assert pytest.approx(B, rel=1e-6) == fit.B and fit.beta == pytest.approx(BETA, rel=1e-9)
    assert fit.curvature == pytest.approx(CURVATURE) and not fit.warnings
    noisy = fit_runs(synthetic_runs(noise=2e-4, seed=1))  # noise of 0.0002 nats per run
    assert pytest.approx(A, rel=0.02) == noisy.A and noisy.alpha == pytest.approx(ALPHA, rel=0.02)
    assert noisy.alpha_stderr < 0.01
    budget = 3e23  # predicting past the ladder, at and off the optimum
    assert noisy.optimal_tokens(budget) == pytest.approx(A * budget**ALPHA, rel=0.1)
    off = A * budget**ALPHA * math.exp(1.0)
    assert fit.predict_loss(budget, off) == pytest.approx(B * budget ** (-BETA) + CURVATURE, rel=1e-6)


def test_an_isoflop_minimum_is_the_parabola_vertex_and_flagged_when_outside_the_runs():
    tokens = [1e6, 2e6, 4e6, 8e6]
    x = np.log(tokens)
    losses = 0.3 * (x - math.log(3e6)) ** 2 + 4.0
    iso = fit_isoflop(1e15, tokens, losses)
    assert iso.optimal_tokens == pytest.approx(3e6) and iso.optimal_loss == pytest.approx(4.0) and iso.bracketed
    falling = fit_isoflop(1e15, tokens, 0.3 * (x - math.log(3e7)) ** 2 + 4.0)  # the minimum lies beyond the runs
    assert not falling.bracketed and falling.optimal_tokens == pytest.approx(3e7)
    concave = fit_isoflop(1e15, tokens, [4.0, 4.5, 4.6, 4.2])
    assert not concave.bracketed and concave.optimal_loss == 4.0  # no minimum: the best run stands for it
    with pytest.raises(ValueError, match="a parabola needs 3"):
        fit_isoflop(1e15, tokens[:2], losses[:2])


def hand_flops_per_token(dim, n_layers, n_heads, n_kv_heads, vocab, ffn, seq):
    """6 x (non-embedding parameters + the tied output head) + 12 x layers x dim x seq."""
    head_dim = dim // n_heads
    attention = 2 * dim * dim + 2 * dim * n_kv_heads * head_dim
    per_layer = attention + 3 * dim * ffn + 2 * dim
    weights = n_layers * per_layer + dim + vocab * dim  # blocks, final norm, tied head
    return 6 * weights + 12 * n_layers * dim * seq


def test_a_rung_spends_its_budget_with_the_throughput_formula():
    model = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 1024, "multiple_of": 16,
             "tie_embeddings": True}
    rung = plan_rung("d64", {"dim": 64, "n_heads": 4, "n_kv_heads": 2}, 4.5e12, model, seq_len=256,
                     tokens_per_step=2048)
    ffn = ModelConfig.from_dict({**model, "dim": 64, "n_heads": 4, "n_kv_heads": 2}).ffn_hidden_dim
    assert ffn == 176  # 2/3 of 4 x 64 = 170, up to a multiple of 16
    per_token = hand_flops_per_token(64, 2, 4, 2, 1024, ffn, 256)
    assert rung.flops_per_token == per_token
    assert rung.steps == round(4.5e12 / (per_token * 2048)) and rung.tokens == rung.steps * 2048
    assert rung.flops == pytest.approx(4.5e12, rel=1 / rung.steps)  # up to one step of rounding
    assert rung.model["dim"] == 64 and rung.model["n_layers"] == 2  # the shape overrides the shared model


def write_ladder(directory, runs):
    for run in runs:
        folder = directory / run["name"]
        folder.mkdir(parents=True)
        (folder / RUN_FILE).write_text(json.dumps(run))


def test_fit_command_writes_json_png_and_tensorboard_with_the_held_out_check(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = synthetic_runs(noise=1e-3)
    held_out_tokens = A * 3e22**ALPHA
    runs.append({"name": "held_out-3e+22-big", "size": "big", "budget": 3e22, "flops": 3e22, "tokens": held_out_tokens,
                 "params": 10**9, "val_loss": B * 3e22 ** (-BETA) + 0.01, "held_out": True})
    metrics_run = runs[0]
    runs[0] = {**metrics_run, "val_loss": None}  # its loss is read from the run's metrics.csv
    write_ladder(tmp_path, runs)
    (tmp_path / metrics_run["name"] / "csv").mkdir()
    (tmp_path / metrics_run["name"] / "csv" / "metrics.csv").write_text(
        f"step,train/loss,val/loss\n10,9.0,\n20,8.0,{metrics_run['val_loss'] + 1.0}\n30,7.0,{metrics_run['val_loss']}\n")
    (tmp_path / runs[1]["name"] / "tensorboard").mkdir()  # a run's TensorBoard folder, for the report's link
    loaded = {run["name"]: run for run in load_runs(tmp_path)}
    assert loaded[metrics_run["name"]]["val_loss"] == pytest.approx(metrics_run["val_loss"])

    main(["fit", str(tmp_path)])
    summary = json.loads((tmp_path / FIT_FILE).read_text())
    law = summary["N*(C) = A * C^alpha"]
    assert law["alpha"] == pytest.approx(ALPHA, rel=0.02) and law["A"] == pytest.approx(A, rel=0.3)
    assert len(summary["isoflops"]) == 5 and all(iso["bracketed"] for iso in summary["isoflops"])
    held = summary["held_out"]
    assert held["measured_loss"] - held["predicted_loss"] == pytest.approx(held["error"])
    assert held["error"] == pytest.approx(0.01, abs=0.005)
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Scalars("scaling/alpha")[0].value == pytest.approx(law["alpha"], rel=1e-6)
    assert "scaling/figure" in events.Tags()["images"]
    # report.md beside scaling.json: the figure, the laws and the held-out check as scaling.json has them, a row
    # per run (held-out last) with a link to its TensorBoard folder where it has one
    text = (tmp_path / "report.md").read_text()
    assert "![IsoFLOP curves, N*(C) and L*(C)](scaling.png)" in text
    assert f"alpha = {law['alpha']:.4f} (stderr {law['alpha_stderr']:.4f};" in text
    assert f"predicted val/loss {held['predicted_loss']:.4f}, measured {held['measured_loss']:.4f}" in text
    rows = [line for line in text[text.index("## Runs"):].splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(runs) and rows[-1].startswith("| held_out-3e+22-big | big | 3e+22 |")
    linked = runs[1]["name"]
    assert f"| {linked} |" in text and f"[tensorboard]({linked}/tensorboard)" in text
    assert sum("[tensorboard](" in row for row in rows) == 1


def test_fit_of_a_folder_without_runs_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(tmp_path)])
    assert exit_info.value.code == 2 and "run python -m herd.scaling ladder first" in capsys.readouterr().err


def test_the_tiny_ladder_plans_3_budgets_of_4_or_5_sizes_and_a_held_out_run(tmp_path, capsys):
    ladder("tiny_scaling", [], tmp_path, dry_run=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("herd.scaling: ") and "FLOPs" in line]
    budgets = [line.split(": ")[1].split("-")[0] for line in lines[:-1]]
    assert sorted(set(budgets), key=float) == ["2e+11", "5e+11", "1.25e+12"]
    assert [budgets.count(b) for b in ("2e+11", "5e+11", "1.25e+12")] == [5, 5, 4]
    assert lines[-1].startswith("herd.scaling: held_out-")
    assert not any(tmp_path.iterdir())  # a dry run trains nothing


def test_a_budget_may_name_its_sizes_and_unknown_sizes_are_refused():
    settings = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 256, "multiple_of": 16},
                "seq_len": 64, "tokens_per_step": 256,
                "scaling": {"sizes": {"a": {"dim": 16}, "b": {"dim": 32}},
                            "budgets": [1e9, {"flops": 2e9, "sizes": ["b"]}]}}
    assert [(r.budget, r.size) for r in plan_ladder(settings)] == [(1e9, "a"), (1e9, "b"), (2e9, "b")]
    settings["scaling"]["budgets"] = [{"flops": 2e9, "sizes": ["c"]}]
    with pytest.raises(ValueError, match=r"sizes \['c'\] are not in scaling.sizes"):
        plan_ladder(settings)
    assert warmup_steps(100, 0.05) == 5 and warmup_steps(100_000, 0.1, most=2000) == 2000
    assert warmup_steps(1, 0.05) == 1 and warmup_steps(3, 0.9) == 2  # at least 1, fewer than the steps


@pytest.mark.slow
def test_one_rung_trains_through_herd_train_and_records_its_val_loss(tmp_path, prepared_corpus):
    overrides = [f"data.data_dir={prepared_corpus}", "data.seq_len=64", "data.num_workers=0", "model.vocab_size=512",
                 "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "export=false",
                 "trainer.limit_val_batches=4"]
    model = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 512, "multiple_of": 16,
             "tie_embeddings": True}
    rung = plan_rung("d32", {}, 6 * 512 * hand_flops_per_token(32, 2, 2, 1, 512, 96, 64), model, seq_len=64,
                     tokens_per_step=512)
    assert rung.steps == 6
    record = train_rung(rung, tmp_path, "tiny_scaling", overrides, warmup_fraction=0.05)
    saved = json.loads((tmp_path / rung.name / RUN_FILE).read_text())
    assert saved["val_loss"] == record["val_loss"] and math.log(512) - 1.5 < saved["val_loss"] < math.log(512) + 0.5
    assert f"trainer.max_steps={rung.steps}" in saved["command"]
    again = train_rung(rung, tmp_path, "tiny_scaling", overrides, warmup_fraction=0.05)  # finished: skipped
    assert again["val_loss"] == record["val_loss"]
