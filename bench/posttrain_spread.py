"""How much the post-training pipeline's figures vary with the start model: 3 starts, mean and range.

Each start is the main job (``python -m herd.train``, what ``make train`` runs) with its own
``seed``; then ``python -m herd.pipeline pipeline=tiny_posttrain`` runs from that export (the
pipeline's own steps keep their seeds). The table gives, per round, the mean and the range
(min..max) over the starts of the pipeline's ``summary.json`` columns, and each start's row.
Everything runs one command at a time in this process's environment (about 17 minutes a start on
an idle 2-core machine); finished steps are reused when the command is run again.

    python bench/posttrain_spread.py                      # seeds 1 2 3, logs under logs/spread/
    python bench/posttrain_spread.py --seeds 1 2 3 4 5 --pipeline-args rounds=3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

COLUMNS = ("held-out reward", "held-out F1", "SFT val/answer_f1", "RM val/accuracy", "DPO val margin")


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def start_model(logs: Path, seed: int) -> Path:
    """The main job's export with this seed (trained once; reused when it exists)."""
    run_dir = logs / f"pretrain-seed{seed}"
    export = run_dir / "export"
    if not (export / "config.json").is_file():
        run([sys.executable, "-m", "herd.train", f"seed={seed}", f"hydra.run.dir={run_dir}",
             f"paths.log_dir={logs}", "resume=auto"])
    return export


def pipeline(logs: Path, seed: int, export: Path, extra: list[str]) -> dict:
    name = f"tiny_posttrain-seed{seed}"
    run([sys.executable, "-m", "herd.pipeline", "pipeline=tiny_posttrain", f"start={export}", f"run={name}",
         f"log_dir={logs.resolve()}", *extra])
    return json.loads((logs / "pipeline" / name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--logs", type=Path, default=Path("logs/spread"))
    parser.add_argument("--pipeline-args", nargs="*", default=[], help="overrides for every pipeline")
    args = parser.parse_args()
    summaries = {seed: pipeline(args.logs, seed, start_model(args.logs, seed), args.pipeline_args)
                 for seed in args.seeds}
    rounds = sorted({row["round"] for summary in summaries.values() for row in summary["rounds"]})
    report = {"seeds": args.seeds, "rounds": []}
    print(f"\npipeline=tiny_posttrain from {len(args.seeds)} starts (main job seeds {args.seeds}): mean [min..max]")
    print("| round | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for number in rounds:
        cells, entry = [], {"round": number}
        for column in COLUMNS:
            values = [row[column] for summary in summaries.values() for row in summary["rounds"]
                      if row["round"] == number and row.get(column) is not None]
            if not values:
                cells.append("")
                continue
            entry[column] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                             "values": values}
            cells.append(f"{statistics.fmean(values):.3f} [{min(values):.3f}..{max(values):.3f}]")
        report["rounds"].append(entry)
        print(f"| {number} | " + " | ".join(cells) + " |")
    print("\nper start:")
    for seed, summary in summaries.items():
        row = " -> ".join(f"{r['held-out reward']:.3f}" for r in summary["rounds"])
        accuracy = ", ".join(f"{r['RM val/accuracy']:.3f}" for r in summary["rounds"] if r.get("RM val/accuracy"))
        print(f"  seed {seed}: held-out reward {row}; reward-model accuracy {accuracy}; "
              f"final model {summary.get('final_model')}")
    (args.logs / "spread.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.logs / 'spread.json'}")


if __name__ == "__main__":
    main()
