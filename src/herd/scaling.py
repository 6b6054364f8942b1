"""Scaling laws as in the Llama 3 paper (section 3.2.1): IsoFLOP curves, the compute-optimal token
count N*(C) = A * C^alpha, and a prediction of a larger run's loss that is then checked.

Two commands::

    python -m herd.scaling ladder [--dir DIR] [--dry-run] [--experiment tiny_scaling] [override ...]
    python -m herd.scaling fit DIR

``ladder`` reads the ``scaling`` section of a train experiment (``experiment=tiny_scaling``:
``budgets``, ``sizes``, ``warmup_fraction``, ``held_out``) and trains every (size, budget) rung as
its own ``python -m herd.train`` run in ``DIR/<budget>-<size>/`` (default DIR:
``logs/<task>/ladders/<time>``). A rung's training FLOPs are those of the throughput callback,
``ModelConfig.flops_per_token(seq_len)`` (6N + 12 * layers * dim * seq_len) per token, so its
token budget is ``budget / flops_per_token`` and ``trainer.max_steps`` is that divided by the
tokens of one optimizer step (rounded, so the FLOPs actually spent are recorded next to the
budget). Each run validates once, at its last step; its ``val/loss`` is what the fit uses. The
ladder then fits, trains the held-out run (a larger model at a larger budget; among several
candidate sizes, the one nearest the fitted optimum) and fits again, reporting the predicted and
measured loss of that run. A ladder started again with the same ``--dir`` skips the runs that
finished. Extra overrides go to every run (``trainer.accelerator=gpu``, ``data.batch_size=16``).

``fit`` does the fitting and plotting alone, on the runs a ladder left in DIR:

1. per budget, a parabola of val loss in ln(training tokens) (np.polyfit); its vertex is the
   IsoFLOP minimum: the compute-optimal tokens N*(C) and loss L*(C) of that budget. At a fixed
   budget the tokens fix the model's FLOPs per token (C / tokens), so this is the paper's
   parabola over model sizes, read on its x axis (training tokens, as its Figure 2);
2. ``ln N*(C) = ln A + alpha ln C`` and ``ln L*(C) = ln B - beta ln C`` by least squares
   (scipy.stats.linregress, with standard errors);
3. the loss predicted for a run of ``tokens`` at budget C is
   ``L*(C) + k * (ln tokens - ln N*(C))**2``, k the mean curvature of the fitted parabolas.

It writes ``DIR/scaling.json`` (every number, the runs included), ``DIR/scaling.png`` (the IsoFLOP
curves with their minima, N*(C) with its fit, and L*(C) with the held-out run), TensorBoard
scalars and the figure in ``DIR/tensorboard``, and ``DIR/report.md``: the figure, the fitted laws
and the held-out check, the minima, and every run with its val/loss and links to its TensorBoard
folder and log.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from herd import cli, reports
from herd.commands import read_record, run_logged, write_record
from herd.scalars import read_scalars

RUN_FILE = "scaling_run.json"
TRAIN_LOG = "herd.train.out"  # a rung's console output
FIT_FILE = "scaling.json"
PLOT_FILE = "scaling.png"


# ----------------------------------------------------------------------------------------- fitting


@dataclass
class IsoFLOP:
    """One budget's runs and the parabola fitted to their loss in ln(tokens)."""

    budget: float  # training FLOPs (the mean spent by its runs)
    tokens: list[float]
    losses: list[float]
    sizes: list[str]
    coefficients: list[float]  # a, b, c of a * x**2 + b * x + c, x = ln(tokens)
    optimal_tokens: float  # the vertex: exp(-b / 2a)
    optimal_loss: float
    bracketed: bool  # the vertex lies within the tokens tried (else the minimum is extrapolated)

    @property
    def curvature(self) -> float:
        """``a``: how fast the loss rises away from the optimum, per (ln tokens)**2."""
        return self.coefficients[0]


def fit_isoflop(budget: float, tokens: Sequence[float], losses: Sequence[float],
                sizes: Sequence[str] | None = None) -> IsoFLOP:
    """Fit ``loss = a x**2 + b x + c`` with ``x = ln tokens``; the vertex is the IsoFLOP minimum.

    Needs three runs or more. A parabola that opens downwards has no minimum: then the best run
    stands for it, and ``bracketed`` is False.
    """
    if len(tokens) < 3:
        raise ValueError(f"the budget {budget:.3g} FLOPs has {len(tokens)} finished run(s); a parabola needs 3")
    x = np.log(np.asarray(tokens, dtype=float))
    y = np.asarray(losses, dtype=float)
    a, b, c = np.polyfit(x, y, 2)
    if a > 0:
        vertex = -b / (2 * a)
        optimum = (float(math.exp(vertex)), float(c - b * b / (4 * a)))
        bracketed = bool(x.min() <= vertex <= x.max())
    else:
        best = int(np.argmin(y))
        optimum, bracketed = (float(tokens[best]), float(y[best])), False
    return IsoFLOP(float(budget), [float(t) for t in tokens], [float(v) for v in y], list(sizes or []),
                   [float(a), float(b), float(c)], optimum[0], optimum[1], bracketed)


@dataclass
class ScalingFit:
    """The IsoFLOP minima and the power laws through them (see the module docstring)."""

    isoflops: list[IsoFLOP]
    alpha: float
    A: float
    alpha_stderr: float
    beta: float
    B: float
    beta_stderr: float
    curvature: float
    warnings: list[str] = field(default_factory=list)

    def optimal_tokens(self, budget: float) -> float:
        """N*(C) = A * C**alpha: the compute-optimal training tokens at ``budget`` FLOPs."""
        return self.A * budget**self.alpha

    def optimal_loss(self, budget: float) -> float:
        """L*(C) = B * C**-beta: the loss of the compute-optimal run at ``budget`` FLOPs."""
        return self.B * budget ** (-self.beta)

    def predict_loss(self, budget: float, tokens: float) -> float:
        """The loss of a run of ``tokens`` at ``budget``: L*(C) + k (ln tokens - ln N*(C))**2."""
        return self.optimal_loss(budget) + self.curvature * math.log(tokens / self.optimal_tokens(budget)) ** 2


def fit_scaling(isoflops: Sequence[IsoFLOP]) -> ScalingFit:
    """Fit N*(C) = A C**alpha and L*(C) = B C**-beta through the IsoFLOP minima (at least two budgets)."""
    from scipy.stats import linregress

    if len(isoflops) < 2:
        raise ValueError(f"{len(isoflops)} budget(s) with finished runs; fitting N*(C) needs at least 2")
    budgets = np.log([iso.budget for iso in isoflops])
    tokens = linregress(budgets, np.log([iso.optimal_tokens for iso in isoflops]))
    losses = linregress(budgets, np.log([iso.optimal_loss for iso in isoflops]))
    curvatures = [iso.curvature for iso in isoflops if iso.curvature > 0]
    warnings = [f"the parabola at {iso.budget:.3g} FLOPs opens downwards (no minimum): its best run stands for the "
                "minimum; the runs are not parabolic in ln(tokens) (check for runs too short to learn)"
                if iso.curvature <= 0 else
                f"the IsoFLOP minimum at {iso.budget:.3g} FLOPs lies outside the tokens tried (extrapolated): "
                "add a size on that side" for iso in isoflops if not iso.bracketed]
    stderr = (float(tokens.stderr), float(losses.stderr)) if len(isoflops) > 2 else (math.nan, math.nan)
    return ScalingFit(list(isoflops), float(tokens.slope), float(math.exp(tokens.intercept)), stderr[0],
                      float(-losses.slope), float(math.exp(losses.intercept)), stderr[1],
                      float(np.mean(curvatures)) if curvatures else 0.0, warnings)


def fit_runs(runs: Sequence[dict[str, Any]]) -> ScalingFit:
    """Group finished ladder runs by budget and fit (held-out runs are left out)."""
    groups: dict[float, list[dict[str, Any]]] = {}
    for run in runs:
        if not run.get("held_out") and run.get("val_loss") is not None:
            groups.setdefault(float(run["budget"]), []).append(run)
    isoflops = []
    for budget in sorted(groups):
        rungs = sorted(groups[budget], key=lambda r: r["tokens"])
        isoflops.append(fit_isoflop(float(np.mean([r["flops"] for r in rungs])), [r["tokens"] for r in rungs],
                                    [r["val_loss"] for r in rungs], [r["size"] for r in rungs]))
    return fit_scaling(isoflops)


# ------------------------------------------------------------------------------------------- runs


def load_runs(directory: str | Path) -> list[dict[str, Any]]:
    """The run records (``scaling_run.json``) under ``directory``, with their val/loss read now when missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder; give the ladder folder that "
                                "python -m herd.scaling ladder wrote (logs/<task>/ladders/<time>)")
    runs = []
    for path in sorted(directory.glob(f"*/{RUN_FILE}")):
        run = json.loads(path.read_text())
        if run.get("val_loss") is None:
            run["val_loss"] = final_val_loss(path.parent)
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"no {RUN_FILE} under {directory}: run python -m herd.scaling ladder first")
    return runs


def final_val_loss(run_dir: str | Path) -> float | None:
    """The last ``val/loss`` a run logged: from its metrics.csv, else from its TensorBoard events."""
    run_dir = Path(run_dir)
    for path in sorted(run_dir.glob("**/metrics.csv")):
        with path.open(newline="") as file:
            values = [float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")]
        if values:
            return values[-1]
    for event_dir in sorted({e.parent for e in run_dir.glob("**/events.out.tfevents.*")}):
        values = read_scalars(event_dir).get("val/loss")
        if values:
            return values[-1].value
    return None


@dataclass(frozen=True)
class Rung:
    """One run of the ladder: a size at a budget, and what that makes of it."""

    name: str
    size: str
    budget: float
    shape: dict[str, Any]  # the size's model.* overrides
    model: dict[str, Any]  # the whole model config they make
    params: int
    flops_per_token: float
    tokens_per_step: int
    steps: int
    held_out: bool = False

    @property
    def tokens(self) -> int:
        """Training tokens: steps x tokens per step."""
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """Training FLOPs actually spent (the budget, up to rounding to whole steps)."""
        return self.tokens * self.flops_per_token

    def record(self) -> dict[str, Any]:
        """What ``scaling_run.json`` holds before the run (its val_loss is added after)."""
        return {**asdict(self), "tokens": self.tokens, "flops": self.flops, "val_loss": None}


def plan_rung(size: str, shape: dict[str, Any], budget: float, model: dict[str, Any], seq_len: int,
              tokens_per_step: int, held_out: bool = False) -> Rung:
    """The rung of ``size`` (model overrides ``shape`` on ``model``) at ``budget`` FLOPs."""
    from herd.model import ModelConfig

    config = ModelConfig.from_dict({**model, **shape})
    flops_per_token = config.flops_per_token(seq_len)
    steps = max(1, round(budget / (flops_per_token * tokens_per_step)))
    prefix = "held_out-" if held_out else ""
    return Rung(f"{prefix}{budget:.3g}-{size}", size, float(budget), dict(shape), config.to_dict(), config.num_params(),
                flops_per_token, tokens_per_step, steps, held_out)


def ladder_settings(experiment: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The train config's ``scaling`` section, model, tokens per step and log folder, as plain values."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from herd.presets import config_dir

    cli.register_resolvers()  # the train config's ${herd_root:} and ${herd_run_id:}

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} (the default task name) resolves
    if "scaling" not in cfg:
        raise ValueError(f"experiment={experiment} has no scaling section (budgets, sizes, held_out); "
                         "use experiment=tiny_scaling or one built like it")
    trainer = cfg.trainer
    devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    tokens_per_step = (int(cfg.data.batch_size) * int(cfg.data.seq_len) * devices * int(trainer.num_nodes)
                       * int(trainer.accumulate_grad_batches))
    return {"scaling": OmegaConf.to_container(cfg.scaling, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=True), "seq_len": int(cfg.data.seq_len),
            "tokens_per_step": tokens_per_step, "log_dir": Path(str(cfg.paths.log_dir)) / str(cfg.task)}


def plan_ladder(settings: dict[str, Any]) -> list[Rung]:
    """Every (size, budget) rung of the ladder, smallest budget first.

    A budget is a number of FLOPs (every size of ``sizes`` runs at it) or ``{flops: C, sizes:
    [names]}`` (those sizes only: at the paper's ranges each budget tries the sizes around its
    optimum).
    """
    scaling = settings["scaling"]
    shapes = scaling["sizes"]
    rungs = []
    for entry in scaling["budgets"]:
        budget, names = (entry["flops"], entry["sizes"]) if isinstance(entry, dict) else (entry, list(shapes))
        unknown = [name for name in names if name not in shapes]
        if unknown:
            raise ValueError(f"scaling.budgets: sizes {unknown} are not in scaling.sizes {sorted(shapes)}")
        rungs += [plan_rung(name, shapes[name], float(budget), settings["model"], settings["seq_len"],
                            settings["tokens_per_step"]) for name in names]
    return sorted(rungs, key=lambda rung: rung.budget)


def plan_held_out(settings: dict[str, Any], fit: ScalingFit | None) -> Rung | None:
    """The held-out rung: the candidate size whose tokens at the held-out budget are nearest N*(C)."""
    held_out = settings["scaling"].get("held_out")
    if not held_out:
        return None
    budget = float(held_out["budget"])
    candidates = [plan_rung(size, shape, budget, settings["model"], settings["seq_len"],
                            settings["tokens_per_step"], held_out=True) for size, shape in held_out["sizes"].items()]
    if fit is None or len(candidates) == 1:
        return candidates[0]
    optimum = fit.optimal_tokens(budget)
    return min(candidates, key=lambda rung: abs(math.log(rung.tokens / optimum)))


def warmup_steps(steps: int, fraction: float, most: int | None = None) -> int:
    """Warmup steps of a run of ``steps``: ``fraction`` of them, at most ``most``, at least 1, fewer than ``steps``."""
    warmup = max(1, round(fraction * steps))
    if most is not None:
        warmup = min(warmup, int(most))
    return max(1, min(warmup, steps - 1))


def run_command(rung: Rung, experiment: str, overrides: Sequence[str], run_dir: Path, warmup: int) -> list[str]:
    """The ``python -m herd.train`` command line of one rung."""
    shape = [f"model.{key}={'null' if value is None else value}" for key, value in rung.shape.items()]
    return [sys.executable, "-m", "herd.train", f"experiment={experiment}", *overrides, *shape,
            f"trainer.max_steps={rung.steps}", f"trainer.val_check_interval={rung.steps}",
            f"stage.scheduler.warmup_steps={warmup}", f"hydra.run.dir={run_dir}"]


def train_rung(rung: Rung, directory: Path, experiment: str, overrides: Sequence[str], warmup_fraction: float,
               dry_run: bool = False, max_warmup_steps: int | None = None,
               threads: int | None = None) -> dict[str, Any] | None:
    """Train one rung into ``directory/<name>`` (skipped when it finished before); returns its record.

    ``threads`` sets the run's ``OMP_NUM_THREADS`` (torch's threads); None leaves torch's default.
    """
    run_dir = directory / rung.name
    record_file = run_dir / RUN_FILE
    record = read_record(record_file)
    if record.get("val_loss") is not None:
        print(f"herd.scaling: {rung.name} finished before (val/loss {record['val_loss']:.4f}); skipped", flush=True)
        return record
    warmup = warmup_steps(rung.steps, warmup_fraction, max_warmup_steps)
    command = run_command(rung, experiment, overrides, run_dir, warmup)
    print(f"herd.scaling: {rung.name}: {rung.params:,} parameters, {rung.flops_per_token / 1e6:.2f} MFLOPs/token, "
          f"{rung.steps} steps x {rung.tokens_per_step} = {rung.tokens:,} tokens, {rung.flops:.3g} FLOPs", flush=True)
    if dry_run:
        print("  " + " ".join(command))
        return None
    if run_dir.exists():  # an earlier attempt that did not finish: keep it aside, start again
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{datetime.now():%Y%m%d-%H%M%S}"))
    run_dir.mkdir(parents=True)
    record = rung.record() | {"command": command}
    write_record(record_file, record)
    log_file = run_dir / TRAIN_LOG
    finished = run_logged(command, log_file, echo=False, env={"OMP_NUM_THREADS": str(threads)} if threads else None)
    record["seconds"] = round(finished.seconds, 1)
    if finished.status != 0:
        raise RuntimeError(f"{rung.name} failed (exit {finished.status}); see {log_file}")
    record["val_loss"] = final_val_loss(run_dir)
    if record["val_loss"] is None:
        raise RuntimeError(f"{rung.name} finished without a val/loss; see {log_file}")
    write_record(record_file, record)
    print(f"herd.scaling: {rung.name}: val/loss {record['val_loss']:.4f} in {record['seconds']:.0f} s", flush=True)
    return record


def ladder(experiment: str, overrides: Sequence[str], directory: Path | None = None,
           dry_run: bool = False) -> dict[str, Any] | None:
    """Train the ladder, fit, train the held-out run, fit again and write the outputs; returns the summary.

    ``scaling.parallel`` rungs train at once (default 1), each with ``scaling.threads`` torch
    threads (default: torch's choice). On a small shared CPU, two runs of one thread each finish
    the ladder much sooner than one run of two threads: tiny models cannot keep two threads busy,
    and threads that wait on each other waste what other processes leave free.
    """
    settings = ladder_settings(experiment, overrides)
    scaling = settings["scaling"]
    directory = directory or settings["log_dir"] / "ladders" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    options = {"warmup_fraction": float(scaling.get("warmup_fraction", 0.05)), "dry_run": dry_run,
               "max_warmup_steps": scaling.get("max_warmup_steps"), "threads": scaling.get("threads")}
    start = time.perf_counter()
    print(f"herd.scaling: ladder of experiment={experiment} in {directory}", flush=True)
    rungs = plan_ladder(settings)
    parallel = 1 if dry_run else max(1, int(scaling.get("parallel") or 1))
    with ThreadPoolExecutor(max_workers=parallel) as pool:  # each thread waits on one herd.train process
        # larger models first: the long runs of small models then fill the gaps
        list(pool.map(lambda rung: train_rung(rung, directory, experiment, overrides, **options),
                      sorted(rungs, key=lambda r: -r.flops_per_token) if parallel > 1 else rungs))
    fit = None if dry_run else fit_runs(load_runs(directory))
    held_out = plan_held_out(settings, fit)
    if held_out is not None:
        if fit is not None:
            print(f"herd.scaling: held-out run {held_out.name}: N*(C) = {fit.optimal_tokens(held_out.budget):,.0f} "
                  f"tokens; this size trains {held_out.tokens:,}; predicted val/loss "
                  f"{fit.predict_loss(held_out.flops, held_out.tokens):.4f}", flush=True)
        train_rung(held_out, directory, experiment, overrides, **options)
    if dry_run:
        return None
    summary = write_fit(directory)
    summary["ladder_seconds"] = round(time.perf_counter() - start, 1)
    (directory / FIT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------- outputs


def summarize(fit: ScalingFit, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The content of ``scaling.json``: the fitted numbers, the minima, the held-out check and the runs."""
    summary: dict[str, Any] = {
        "N*(C) = A * C^alpha": {"A": fit.A, "alpha": fit.alpha, "alpha_stderr": fit.alpha_stderr},
        "L*(C) = B * C^-beta": {"B": fit.B, "beta": fit.beta, "beta_stderr": fit.beta_stderr},
        "curvature": fit.curvature,
        "isoflops": [{"budget": iso.budget, "optimal_tokens": iso.optimal_tokens, "optimal_loss": iso.optimal_loss,
                      "bracketed": iso.bracketed, "coefficients": iso.coefficients, "sizes": iso.sizes,
                      "tokens": iso.tokens, "losses": iso.losses} for iso in fit.isoflops],
        "warnings": fit.warnings,
        "runs": list(runs),
    }
    held_out = [r for r in runs if r.get("held_out") and r.get("val_loss") is not None]
    if held_out:
        run = held_out[0]
        predicted = fit.predict_loss(run["flops"], run["tokens"])
        summary["held_out"] = {
            "name": run["name"], "budget": run["flops"], "tokens": run["tokens"], "params": run["params"],
            "optimal_tokens": fit.optimal_tokens(run["flops"]), "optimal_loss": fit.optimal_loss(run["flops"]),
            "predicted_loss": predicted, "measured_loss": run["val_loss"],
            "error": run["val_loss"] - predicted, "relative_error": (run["val_loss"] - predicted) / run["val_loss"],
        }
    return summary


def plot(summary: dict[str, Any], path: str | Path) -> Path:
    """The figure: IsoFLOP curves and minima (as the paper's Figure 2), N*(C) with its fit (Figure 3),
    and L*(C) with the held-out run's prediction and measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    isoflops = summary["isoflops"]
    law, loss_law = summary["N*(C) = A * C^alpha"], summary["L*(C) = B * C^-beta"]
    held = summary.get("held_out")
    figure, (curves, tokens_axis, loss_axis) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, len(isoflops)))
    for iso, color in zip(isoflops, colors, strict=True):
        x = np.array(iso["tokens"])
        grid = np.exp(np.linspace(np.log(x.min()) - 0.3, np.log(x.max()) + 0.3, 100))
        a, b, c = iso["coefficients"]
        curves.plot(x, iso["losses"], "o", color=color, label=f"{iso['budget']:.2g} FLOPs")
        curves.plot(grid, a * np.log(grid) ** 2 + b * np.log(grid) + c, "-", color=color, alpha=0.7)
        curves.plot([iso["optimal_tokens"]], [iso["optimal_loss"]], "*", color="black", markersize=12)
    if held:
        curves.plot([held["tokens"]], [held["measured_loss"]], "D", color="crimson", label="held-out run")
    curves.set(xscale="log", xlabel="training tokens", ylabel="validation loss", title="IsoFLOP curves")
    curves.legend(fontsize=8)

    budgets = np.array([iso["budget"] for iso in isoflops])
    top = max(budgets.max(), held["budget"] if held else 0)
    grid = np.geomspace(budgets.min() / 1.5, top * 1.5, 50)
    tokens_axis.plot(budgets, [iso["optimal_tokens"] for iso in isoflops], "*", color="black", markersize=12,
                     label="IsoFLOP minima")
    tokens_axis.plot(grid, law["A"] * grid ** law["alpha"], "--", color="tab:blue",
                     label=f"N*(C) = {law['A']:.3g} C^{law['alpha']:.3f}")
    if held:
        tokens_axis.plot([held["budget"]], [held["tokens"]], "D", color="crimson", label="held-out run")
    tokens_axis.set(xscale="log", yscale="log", xlabel="compute (FLOPs)", ylabel="training tokens",
                    title="compute-optimal tokens")
    tokens_axis.legend(fontsize=8)

    loss_axis.plot(budgets, [iso["optimal_loss"] for iso in isoflops], "*", color="black", markersize=12,
                   label="IsoFLOP minima")
    loss_axis.plot(grid, loss_law["B"] * grid ** (-loss_law["beta"]), "--", color="tab:green",
                   label=f"L*(C) = {loss_law['B']:.3g} C^-{loss_law['beta']:.3f}")
    if held:
        loss_axis.plot([held["budget"]], [held["predicted_loss"]], "s", color="tab:orange", markerfacecolor="none",
                       markersize=10, label=f"predicted {held['predicted_loss']:.3f}")
        loss_axis.plot([held["budget"]], [held["measured_loss"]], "D", color="crimson",
                       label=f"measured {held['measured_loss']:.3f}")
    loss_axis.set(xscale="log", xlabel="compute (FLOPs)", ylabel="validation loss", title="loss at the optimum")
    loss_axis.legend(fontsize=8)
    for axis in (curves, tokens_axis, loss_axis):  # label the decades only: minor labels overlap
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    tokens_axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_tensorboard(summary: dict[str, Any], directory: str | Path, png: Path | None = None) -> None:
    """The fitted numbers as scalars (``scaling/...``) and the figure as an image."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    try:
        law, loss_law = summary["N*(C) = A * C^alpha"], summary["L*(C) = B * C^-beta"]
        for name, value in (("alpha", law["alpha"]), ("A", law["A"]), ("beta", loss_law["beta"]),
                            ("B", loss_law["B"]), ("curvature", summary["curvature"])):
            writer.add_scalar(f"scaling/{name}", value, 0)
        for step, iso in enumerate(summary["isoflops"]):
            writer.add_scalar("scaling/isoflop_optimal_tokens", iso["optimal_tokens"], step)
            writer.add_scalar("scaling/isoflop_optimal_loss", iso["optimal_loss"], step)
        if "held_out" in summary:
            for key in ("predicted_loss", "measured_loss", "error", "relative_error"):
                writer.add_scalar(f"scaling/held_out_{key}", summary["held_out"][key], 0)
        if png is not None:
            import matplotlib.image

            image = matplotlib.image.imread(str(png))[..., :3]  # (H, W, 3) floats in [0, 1]
            writer.add_image("scaling/figure", image, 0, dataformats="HWC")
    finally:
        writer.close()


def write_fit(directory: str | Path) -> dict[str, Any]:
    """Fit the runs in ``directory``; write scaling.json, scaling.png and TensorBoard; print the numbers."""
    directory = Path(directory)
    runs = load_runs(directory)
    summary = summarize(fit_runs(runs), runs)
    png = plot(summary, directory / PLOT_FILE)
    (directory / FIT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    tensorboard = directory / "tensorboard"
    if tensorboard.exists():
        shutil.rmtree(tensorboard)  # one fit per folder: a refit replaces the events
    write_tensorboard(summary, tensorboard, png)
    markdown = write_report(summary, directory, png)
    print(report(summary))
    print(f"written to {directory / FIT_FILE}, {png}, {markdown} and {tensorboard}")
    return summary


def write_report(summary: dict[str, Any], directory: Path, png: Path) -> Path:
    """``report.md`` beside scaling.json: the figure, the fitted laws, the held-out check, the IsoFLOP
    minima, and every run with its val/loss and a link to its TensorBoard folder."""
    lines = [f"# herd.scaling: {directory.name}", "",
             f"IsoFLOP curves with their minima, N*(C) with its fit, and L*(C) with the held-out run "
             f"(numbers: {reports.link(directory / FIT_FILE, directory)}).", "",
             f"![IsoFLOP curves, N*(C) and L*(C)]({reports.relative(png, directory)})", "", "## Fits", "",
             *(f"- {line}" for line in fit_lines(summary)),
             f"- curvature of the IsoFLOP parabolas (in ln tokens): {summary['curvature']:.4g}"]
    minima = [{"budget": f"{iso['budget']:.3g}", "N* tokens": f"{iso['optimal_tokens']:,.0f}",
               "L*": iso["optimal_loss"], "within the runs": iso["bracketed"], "runs": len(iso["tokens"])}
              for iso in summary["isoflops"]]
    lines += ["", "## IsoFLOP minima", "", *reports.table(minima, list(minima[0]) if minima else []), "", "## Runs", "",
              f"TensorBoard, every run: `tensorboard --logdir {directory}`; the fit's scalars and figure: "
              f"{reports.link(directory / 'tensorboard', directory, 'tensorboard')}.", ""]
    runs = []
    for run in sorted(summary["runs"], key=lambda r: (bool(r.get("held_out")), r.get("budget", 0), r.get("params", 0))):
        folder = directory / str(run.get("name"))
        board = folder / "tensorboard"
        runs.append({"run": run.get("name"), "size": run.get("size"), "budget": f"{run.get('budget', 0):.3g}",
                     "parameters": run.get("params"), "tokens": f"{run.get('tokens', 0):,.0f}",
                     "val/loss": run.get("val_loss"), "held out": bool(run.get("held_out")),
                     "TensorBoard": reports.link(board, directory, "tensorboard") if board.is_dir() else "-",
                     "log": reports.link(folder / TRAIN_LOG, directory, TRAIN_LOG) if (folder / TRAIN_LOG).exists()
                     else "-"})
    lines += reports.table(runs, list(runs[0]) if runs else [])
    return reports.write(directory / reports.REPORT_FILE, lines)


def report(summary: dict[str, Any]) -> str:
    """The fitted numbers as text."""
    lines = ["IsoFLOP minima:"]
    for iso in summary["isoflops"]:
        runs = ", ".join(f"{s} {t:,.0f} tok -> {v:.4f}" for s, t, v in zip(iso["sizes"], iso["tokens"], iso["losses"],
                                                                         strict=True))
        flag = "" if iso["bracketed"] else ("  (no minimum: the best run)" if iso["coefficients"][0] <= 0
                                            else "  (outside the tokens tried)")
        lines.append(f"  {iso['budget']:.3g} FLOPs: N* = {iso['optimal_tokens']:,.0f} tokens, "
                     f"L* = {iso['optimal_loss']:.4f}{flag}\n    runs: {runs}")
    return "\n".join([*lines, *fit_lines(summary)])


def fit_lines(summary: dict[str, Any]) -> list[str]:
    """The fitted laws, the held-out check and the warnings, a line each (the text and the Markdown report)."""
    law, loss_law = summary["N*(C) = A * C^alpha"], summary["L*(C) = B * C^-beta"]
    lines = [f"N*(C) = A * C^alpha: A = {law['A']:.4g}, alpha = {law['alpha']:.4f} "
             f"(stderr {law['alpha_stderr']:.4f}; the paper: A = 0.29, alpha = 0.53)",
             f"L*(C) = B * C^-beta: B = {loss_law['B']:.4g}, beta = {loss_law['beta']:.4f}"]
    held = summary.get("held_out")
    if held:
        lines.append(f"held-out run {held['name']} ({held['params']:,} parameters, {held['tokens']:,.0f} tokens, "
                     f"{held['budget']:.3g} FLOPs): predicted val/loss {held['predicted_loss']:.4f}, measured "
                     f"{held['measured_loss']:.4f}, error {held['error']:+.4f} ({100 * held['relative_error']:+.2f}%)")
    return lines + [f"warning: {w}" for w in summary["warnings"]]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m herd.scaling ladder|fit ...``; user errors exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m herd.scaling", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("ladder", help="train the ladder and the held-out run, then fit")
    run.add_argument("--experiment", default="tiny_scaling", help="a train experiment with a scaling section")
    run.add_argument("--dir", type=Path, default=None, help="ladder folder (default logs/<task>/ladders/<time>); "
                                                             "an existing one is continued")
    run.add_argument("--dry-run", action="store_true", help="print the runs and their commands, train nothing")
    run.add_argument("overrides", nargs="*", help="herd.train overrides for every run (key=value)")
    fit = commands.add_parser("fit", help="fit and plot the runs of a ladder folder")
    fit.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    with cli.user_errors("herd.scaling", (FileNotFoundError, ValueError, RuntimeError)):
        if args.command == "fit":
            write_fit(args.dir)
        else:
            ladder(args.experiment, args.overrides, args.dir, args.dry_run)


if __name__ == "__main__":
    main()
