"""Curated against uncurated pretraining at the same token budget, on clean held-out text.

    python bench/curate_training.py                         # work folder: data/curate_training
    python bench/curate_training.py --work /tmp/ct --steps 120 --noise 1

Every step is a herd command in its own process, as a user runs it (their output goes to
``<work>/logs/``):

1. bench/curate.py's noisy variant of the embedded corpus (planted URL duplicates, near-duplicate
   mirrors, boilerplate lines, server logs, base64 attachments, other languages; ``--noise``
   scales the last three). The ``stdlib:prose`` documents that ``herd.prepare val_fraction=0.1``
   puts in the val split are held out of it.
2. ``python -m herd.curate`` on it (configs/curate.yaml's blocks, English kept, decontamination
   off: it only reports). What each block removed is counted by planted kind from its stage files.
3. ``python -m herd.prepare`` three times with one tokenizer (trained on the uncurated corpus by the
   first): the uncurated corpus, the curated one, and ``stdlib:prose`` at ``val_fraction=0.1``,
   whose val split is exactly the held-out documents: the clean validation text.
4. ``python -m herd.train`` of the tiny preset on each, same seed, steps, batch and sequence length,
   so both see ``steps x batch x seq_len`` tokens.
5. ``python -m herd.evaluate tasks=[perplexity]`` of both exports on the clean val split.

It prints both held-out losses and their difference, and writes ``<work>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from curate import BOILERPLATE, VAL_FRACTION, noisy_corpus

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("copies", "log", "blob", "foreign")


def herd(command: str, args: list[str], log: Path) -> float:
    """Run ``python -m herd.<command> args``, its output in ``log``; returns its seconds. Stops on failure."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", f"herd.{command}", *args], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        sys.exit(f"herd.{command} failed (exit {done.returncode}); the end of {log}:\n" + "\n".join(tail))
    return time.perf_counter() - started


def removals_by_kind(curated: Path, planted: Path) -> list[dict]:
    """Per block, from herd.curate's keep_work stage files: the documents it removed by planted kind
    (``copies``: of stdlib documents, first crawls, URL duplicates and mirrors alike), and ``lost``,
    the stdlib documents whose last copy it removed, with their words; then what is ``kept``, with the
    stdlib documents that still have a copy (``lost``: those that do not)."""
    records = {f"noisy_prose.jsonl:{r['line']}": r for r in map(json.loads, planted.read_text().splitlines())}
    (work,) = curated.glob(".curate-*")
    rows, before, texts = [], None, {}
    for stage in sorted(work.glob("*.jsonl")):
        current = {}
        for line in stage.read_text().splitlines():
            record = json.loads(line)
            current[record["id"]] = record["text"]
        texts = texts or current   # the first stage: the texts as read
        if before is not None:
            rows.append({"block": stage.stem.split("-", 1)[1], **_counts(set(before) - set(current), set(current),
                                                                          records, texts)})
        before = current
    kept = Counter("copies" if records[i]["doc"] else records[i]["kind"] for i in before)
    documents = {records[i]["doc"] for i in records if records[i]["doc"]}
    left = {records[i]["doc"] for i in before if records[i]["doc"]}
    rows.append({"block": "kept", **{k: kept.get(k, 0) for k in KINDS}, "documents": len(left),
                 "lost": len(documents - left), "of": len(documents)})
    return rows


def _counts(ids: set[str], remaining: set[str], records: dict, texts: dict) -> dict:
    kinds = Counter("copies" if records[i]["doc"] else records[i]["kind"] for i in ids)
    left = {records[i]["doc"] for i in remaining if records[i]["doc"]}
    lost = {records[i]["doc"]: i for i in ids if records[i]["doc"] and records[i]["doc"] not in left}
    return {**{k: kinds.get(k, 0) for k in KINDS}, "lost": len(lost),
            "lost_words": sum(len(texts[i].split()) for i in lost.values())}


def boilerplate_lines(path: Path) -> int:
    """Lines of ``path``'s jsonl texts that are one of the planted boilerplate lines."""
    planted = set(BOILERPLATE)
    return sum(line in planted for record in map(json.loads, path.read_text().splitlines())
               for line in record["text"].splitlines())


def held_out_loss(results: Path) -> tuple[float, int]:
    """(loss, tokens) of the clean source in a herd.evaluate results.json."""
    rows = json.loads(results.read_text())["results"]
    row = next(r for r in rows if r["task"] == "perplexity" and r["metric"] == "loss/prose")
    return row["value"], row["n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "curate_training",
                        help="a new (or empty) folder for everything this writes")
    parser.add_argument("--noise", type=float, default=1.0, help="scale of the logs, attachments, foreign documents")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="trainer.threads (default: herd's choice)")
    args = parser.parse_args()
    work = args.work.resolve()
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--work {work} is not empty; give a new folder (or remove that one)")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    logs = work / "logs"

    planted = noisy_corpus(work / "noisy", seed=args.seed, noise=args.noise)
    noisy = work / "noisy" / "noisy_prose.jsonl"
    print(f"noisy corpus: {json.dumps(planted)}")

    curated = work / "curated"
    seconds["curate"] = herd("curate", [
        f"output_dir={curated}", "keep_work=true", "~sources", f"+sources={{web: {{input: {noisy}, url_field: url}}}}",
        "blocks.language.keep=[en]", "blocks.decontaminate.enabled=false"], logs / "curate.log")
    report = json.loads((curated / "report.json").read_text())
    by_kind = removals_by_kind(curated, work / "noisy" / "planted.jsonl")

    prepared = work / "prepared"
    tokenizer = prepared / "uncurated" / "tokenizer"
    common = [f"seq_len={args.seq_len}", "num_proc=1", "progress=false"]
    corpora = {"uncurated": noisy, "curated": curated / "web.jsonl"}
    seconds["prepare"] = 0.0
    for name, path in corpora.items():
        use = [] if name == "uncurated" else [f"tokenizer.path={tokenizer}"]   # the first trains it
        seconds["prepare"] += herd("prepare", [f"output_dir={prepared / name}", "~sources",
                                               f"+sources={{web: {{input: {path}}}}}", *common, *use,
                                               f"hydra.run.dir={logs / ('prepare_' + name)}"],
                                   logs / f"prepare_{name}.log")
    seconds["prepare"] += herd("prepare", [f"output_dir={prepared / 'clean'}", "~sources",
                                           "+sources={prose: {input: 'stdlib:prose'}}", f"val_fraction={VAL_FRACTION}",
                                           f"tokenizer.path={tokenizer}", *common,
                                           f"hydra.run.dir={logs / 'prepare_clean'}"], logs / "prepare_clean.log")
    manifests = {name: json.loads((prepared / name / "manifest.json").read_text()) for name in (*corpora, "clean")}

    budget = args.steps * args.batch * args.seq_len
    losses = {}
    for name in corpora:
        run = work / "train" / name
        train = [f"data.data_dir={prepared / name}", "data.sources=null", f"data.seq_len={args.seq_len}",
                 f"data.batch_size={args.batch}", f"trainer.max_steps={args.steps}",
                 f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=0", "validate_first=false",
                 "callbacks.last_checkpoint=null", "callbacks.best_checkpoint=null", "callbacks.text_samples=null",
                 "callbacks.progress_bar.force=lines", f"seed={args.seed}", f"hydra.run.dir={run}"]
        if args.threads:
            train.append(f"trainer.threads={args.threads}")
        seconds[f"train_{name}"] = herd("train", train, logs / f"train_{name}.log")
        seconds[f"evaluate_{name}"] = herd("evaluate", [
            f"model_dir={run / 'export'}", f"data_dir={prepared / 'clean'}", "tasks=[perplexity]",
            f"perplexity.seq_len={args.seq_len}", f"hydra.run.dir={work / 'evaluate' / name}"],
            logs / f"evaluate_{name}.log")
        losses[name] = held_out_loss(work / "evaluate" / name / "results.json")
    seconds["total"] = time.perf_counter() - started

    splits = {name: next(iter(m["sources"].values()))["splits"] for name, m in manifests.items()}
    tokens = {name: splits[name]["train"]["tokens"] for name in corpora}
    if splits["clean"]["val"]["documents"] != planted["val_docs"]:
        print(f"warning: the clean val split holds {splits['clean']['val']['documents']} documents, the noisy corpus "
              f"held out {planted['val_docs']}")
    summary = {"planted": planted, "blocks": [{k: b[k] for k in ("name", "removed_documents", "removed_tokens",
                                                                 "changed_documents", "cut_tokens", "reasons")}
                                              for b in report["blocks"]],
               "removed_by_kind": by_kind, "documents_per_second": report["documents_per_second"],
               "boilerplate_lines": {"in": boilerplate_lines(noisy), "out": boilerplate_lines(curated / "web.jsonl")},
               "tokens": tokens, "budget_tokens": budget, "steps": args.steps, "batch": args.batch,
               "seq_len": args.seq_len, "seed": args.seed, "noise": args.noise,
               "held_out": {"documents": splits["clean"]["val"]["documents"], "tokens": losses["curated"][1]},
               "loss": {name: loss for name, (loss, _) in losses.items()},
               "difference": losses["curated"][0] - losses["uncurated"][0],
               "seconds": {k: round(v, 1) for k, v in seconds.items()}, "cpu_count": os.cpu_count()}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))


def table(summary: dict) -> str:
    """What the run found, as the lines it prints."""
    lines = ["", f"herd.curate on the noisy corpus ({summary['documents_per_second']:.0f} documents/s per core); "
                 "documents removed, by what was planted (copies: of stdlib documents; lost: stdlib documents "
                 "whose last copy went, and their words):",
             f"  {'block':<12}" + "".join(f"{k:>9}" for k in (*KINDS, "lost", "words"))]
    *blocks, kept = summary["removed_by_kind"]
    for row in blocks:
        lines.append(f"  {row['block']:<12}" + "".join(f"{row[k]:>9,}" for k in (*KINDS, "lost", "lost_words")))
    lines.append(f"  {'kept':<12}" + "".join(f"{kept[k]:>9,}" for k in KINDS)
                 + f"   copies of {kept['documents']:,} of the {kept['of']:,} stdlib documents ({kept['lost']:,} lost)")
    cut = next((b for b in summary["blocks"] if b["name"] == "line_dedup"), None)
    lines.append(f"  boilerplate lines: {summary['boilerplate_lines']['in']:,} planted, "
                 f"{summary['boilerplate_lines']['out']:,} left" + (f" (line_dedup cut lines from "
                                                                       f"{cut['changed_documents']:,} documents)"
                                                                       if cut else ""))
    tokens = summary["tokens"]
    lines.append(f"train tokens: uncurated {tokens['uncurated']:,}, curated {tokens['curated']:,}; clean held-out "
                 f"{summary['held_out']['documents']} documents, {summary['held_out']['tokens']:,} scored tokens")
    lines.append(f"tiny preset, {summary['steps']} steps x {summary['batch']} rows x {summary['seq_len']} tokens = "
                 f"{summary['budget_tokens']:,} tokens each, seed {summary['seed']}")
    loss = summary["loss"]
    lines.append(f"held-out loss (nats/token): uncurated {loss['uncurated']:.4f}, curated {loss['curated']:.4f}, "
                 f"difference {summary['difference']:+.4f}")
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items() if k != "total")
    lines.append(f"wall time {summary['seconds']['total']:.0f} s ({parts})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
