"""How much the CPU demonstrations' figures vary with the start model: N starts, mean and range.

Each start is the main job (``python -m herd.train``, what ``make train`` runs) with its own
``seed`` (its validation loss is the first table). From each start's export:

- ``posttrain``: ``python -m herd.pipeline pipeline=tiny_posttrain`` (its steps keep their own
  seeds); the columns of its ``summary.json``, per round, and the held-out reward's gain over
  round 0 (each start has its own judge, so only the gain compares across starts);
- ``vision``: ``python -m herd.train experiment=tiny_vision seed=<seed>`` (and with
  ``--vision-baseline`` its text-only baseline, ``stage.withhold_images=true``); the last validation;
- ``speech``: ``python -m herd.pipeline pipeline=tiny_speech until=setup/text_only`` (the
  transcript LM, then the one-word speech run and its text-only baseline).

Each table gives the mean and the range (min..max) over the starts, then each start's values; the
whole report is written to ``<logs>/spread.json``. Everything runs one command at a time in this
process's environment; finished runs and pipeline steps are reused when the command is run again,
so a killed run continues where it stopped. On an idle 2-core machine a start takes about 6 minutes,
its post-training pipeline about 15, a vision run about 7 and the speech steps about 6.

    python bench/spread.py                                # every part, seeds 1 2 3, logs under logs/spread/
    python bench/spread.py --parts vision --seeds 1 2 3 4 5
    python bench/spread.py --parts posttrain --pipeline-args rounds=3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from herd.pipeline import training_metrics

PARTS = ("posttrain", "vision", "speech")
POSTTRAIN = ("single reward", "kept reward", "single F1", "kept F1", "held-out reward", "gain", "held-out F1",
             "held-out cut", "SFT val/answer_f1", "RM val/accuracy", "DPO val margin")
VISION = ("val/loss", "val/caption_exact", "val/caption_word_accuracy")
SPEECH = ("speech val/loss", "speech val/wer", "text-only val/loss", "text-only val/wer")


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def train(run_dir: Path, logs: Path, overrides: list[str]) -> dict[str, float]:
    """One ``herd.train`` run in ``run_dir`` (skipped when its export exists; continued when killed),
    and its last validation."""
    if not (run_dir / "export" / "config.json").is_file():
        run([sys.executable, "-m", "herd.train", *overrides, f"hydra.run.dir={run_dir}", f"paths.log_dir={logs}",
             "resume=auto"])
    return training_metrics(run_dir / "tensorboard")


def start_model(logs: Path, seed: int) -> tuple[Path, dict[str, float]]:
    """The main job's export with this seed, and its validation."""
    run_dir = logs / f"pretrain-seed{seed}"
    return run_dir / "export", train(run_dir, logs, [f"seed={seed}"])


def pipeline(logs: Path, config: str, seed: int, export: Path, overrides: list[str]) -> dict:
    """``herd.pipeline pipeline=<config>`` from ``export`` as run ``<config>-seed<seed>`` (finished steps
    are skipped), and its summary."""
    name = f"{config}-seed{seed}"
    run([sys.executable, "-m", "herd.pipeline", f"pipeline={config}", f"start={export}", f"run={name}",
         f"log_dir={logs.resolve()}", *overrides])
    return json.loads((logs / "pipeline" / name / "summary.json").read_text())


def cell(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}..{max(values):.3f}]" if values else ""


def table(title: str, columns: tuple[str, ...], rows: dict[str, dict[int, dict[str, float]]]) -> list[dict]:
    """Print ``rows`` (row label -> seed -> column -> value) as mean [min..max]; returns them for the json."""
    print(f"\n{title}: mean [min..max]")
    print("| | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    out = []
    for label, per_seed in rows.items():
        entry: dict = {"row": label}
        for column in columns:
            values = [m[column] for m in per_seed.values() if m.get(column) is not None]
            if values:
                entry[column] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                                 "values": values}
        out.append(entry)
        print(f"| {label} | " + " | ".join(cell(entry[c]["values"]) if c in entry else "" for c in columns) + " |")
    for label, per_seed in rows.items():
        for seed, metrics in per_seed.items():
            print(f"  {label}, seed {seed}: " + ", ".join(f"{c} {metrics[c]:.3f}" for c in columns
                                                           if metrics.get(c) is not None))
    return out


def posttrain(logs: Path, exports: dict[int, Path], extra: list[str]) -> list[dict]:
    summaries = {seed: pipeline(logs, "tiny_posttrain", seed, export, extra) for seed, export in exports.items()}
    rounds: dict[str, dict[int, dict[str, float]]] = {}
    for seed, summary in summaries.items():
        first = summary["rounds"][0].get("held-out reward")
        for row in summary["rounds"]:
            # each start's judge (its last reward model) has its own scale: the gain over its round 0 compares
            gain = None if first is None or row.get("held-out reward") is None else row["held-out reward"] - first
            rounds.setdefault(f"round {row['round']}", {})[seed] = {**row, "gain": gain}
        print(f"  seed {seed}: final model {summary.get('final_model')}")
    return table(f"pipeline=tiny_posttrain from {len(exports)} starts", POSTTRAIN, rounds)


def vision(logs: Path, exports: dict[int, Path], baseline: bool) -> list[dict]:
    rows: dict[str, dict[int, dict[str, float]]] = {"images": {}, "images withheld": {}}
    for seed, export in exports.items():
        common = ["experiment=tiny_vision", f"stage.init_from={export}", f"seed={seed}"]
        rows["images"][seed] = train(logs / f"vision-seed{seed}", logs, common)
        if baseline:
            rows["images withheld"][seed] = train(logs / f"vision_text_only-seed{seed}", logs,
                                                  [*common, "stage.withhold_images=true", "task=tiny_vision_text_only"])
    rows = {label: per_seed for label, per_seed in rows.items() if per_seed}
    return table(f"experiment=tiny_vision from {len(exports)} starts", VISION, rows)


def speech(logs: Path, exports: dict[int, Path]) -> list[dict]:
    rows = {"one word": {seed: pipeline(logs, "tiny_speech", seed, export, ["until=setup/text_only"])["rounds"][0]
                         for seed, export in exports.items()}}
    return table(f"pipeline=tiny_speech (one-word runs) from {len(exports)} starts", SPEECH, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--logs", type=Path, default=Path("logs/spread"))
    parser.add_argument("--pipeline-args", nargs="*", default=[], help="overrides for every post-training pipeline")
    parser.add_argument("--vision-baseline", action="store_true",
                        help="also the text-only baseline of every vision run (stage.withhold_images=true)")
    args = parser.parse_args()
    starts = {seed: start_model(args.logs, seed) for seed in args.seeds}
    exports = {seed: export for seed, (export, _) in starts.items()}
    report = {"seeds": args.seeds, "starts": table(
        f"the main job (make train) with {len(starts)} seeds", ("val/loss@start", "val/loss", "val/accuracy"),
        {"starts": {seed: metrics for seed, (_, metrics) in starts.items()}})}
    if "posttrain" in args.parts:
        report["posttrain"] = posttrain(args.logs, exports, args.pipeline_args)
    if "vision" in args.parts:
        report["vision"] = vision(args.logs, exports, args.vision_baseline)
    if "speech" in args.parts:
        report["speech"] = speech(args.logs, exports)
    print("\nstarts: " + ", ".join(f"seed {seed}: {export}" for seed, export in exports.items()))
    path = args.logs / "spread.json"  # parts run separately add to it
    previous = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(previous | report, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
