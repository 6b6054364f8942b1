"""Data pipeline throughput against raw ``tokenizers`` on the same text (not a test).

    .venv/bin/python bench/data.py                       # the stdlib code corpus, all cores
    .venv/bin/python bench/data.py --train-tokens-per-s 6200   # a measured training speed

Prints, in tokens per second:

- raw ``tokenizers`` ``encode_batch`` and ``encode_batch_fast`` (no offsets; what herd.prepare
  calls, so the reference), single-threaded, in 1 process and in one process per core at once
  (what this machine's cores deliver together);
- ``herd.prepare`` (read jsonl, tokenize in worker processes, pack, write shards + checksums)
  with ``num_proc`` 1 and every core, relative to raw on the same cores (target >= 80%);
- ``PackedDataModule`` reading the shards (decode, check, re-cut, shuffle, mix, collate), with
  0 and 1 DataLoader workers, relative to what a tiny-preset training step consumes (target
  >= 20x). That consumption is an assumption (5,000 tokens/s on a 2-core CPU) unless measured
  and passed with --train-tokens-per-s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ASSUMED_TRAIN_TOKENS_PER_S = 5_000


def main() -> None:
    """Measure and print every rate (see the module docstring)."""
    args = _arguments()
    cores = len(os.sched_getaffinity(0))
    from herd.data.embedded.corpus import stdlib_code

    texts = [doc.text for doc in stdlib_code() if doc.text.strip()][: args.documents]
    print(f"corpus: {len(texts)} stdlib modules, {sum(map(len, texts)) / 1e6:.1f} MB of text; {cores} cores")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other busy processes skew every figure)")
    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
        tmp = Path(tmp)
        tokenizer_dir = _tokenizer(texts, tmp)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        rounds = {
            n: [_round(texts, corpus, tokenizer_dir, tmp, n) for _ in range(args.repeat)] for n in (1, cores)
        }
        reads = {workers: _read(tmp / f"p{cores}", workers, args.batches) for workers in (0, 1)}
    _report(rounds, reads, args)


def _round(texts, corpus, tokenizer_dir, tmp, n) -> dict[str, float]:
    """Raw and prepare rates on ``n`` cores, measured back to back so that they share the load."""
    return {
        "encode_batch": _raw(texts, tokenizer_dir, n, "encode_batch")[0],
        "encode_batch_fast": _raw(texts, tokenizer_dir, n, "encode_batch_fast")[0],
        "prepare": _prepare(corpus, tokenizer_dir, tmp / f"p{n}", n),
    }


def _report(rounds: dict[int, list[dict[str, float]]], reads: dict[int, float], args) -> None:
    """Print median rates and the median (and range) of prepare/raw per core count, then reads."""
    train = args.train_tokens_per_s or ASSUMED_TRAIN_TOKENS_PER_S
    source = "measured" if args.train_tokens_per_s else "ASSUMED; pass --train-tokens-per-s"
    print(f"\nmedians of {args.repeat} rounds (raw and prepare measured back to back in each round)")
    for n, measured in rounds.items():
        median = {key: statistics.median(r[key] for r in measured) for key in measured[0]}
        ratios = sorted(r["prepare"] / r["encode_batch_fast"] for r in measured)
        print(
            f"  {n} core(s): raw encode_batch          {median['encode_batch']:>12,.0f} tokens/s (with offsets)"
        )
        print(
            f"  {n} core(s): raw encode_batch_fast     {median['encode_batch_fast']:>12,.0f} tokens/s (reference)"
        )
        print(f"  {n} core(s): herd.prepare num_proc={n}    {median['prepare']:>12,.0f} tokens/s = "
              f"{statistics.median(ratios):.0%} of raw on the same cores (rounds: {ratios[0]:.0%}..{ratios[-1]:.0%}; "
              "target >= 80%)")  # fmt: skip
    for workers, rate in reads.items():
        print(f"  PackedDataModule read, {workers} workers  {rate:>12,.0f} tokens/s "
              f"= {rate / train:.0f}x a tiny-preset step ({train:,.0f} tokens/s, {source}; target >= 20x)")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train-tokens-per-s", type=float, default=None, help="measured tiny-preset training speed"
    )
    parser.add_argument("--documents", type=int, default=None, help="use only the first N stdlib modules")
    parser.add_argument("--batches", type=int, default=400, help="batches of 8 x 512 tokens to read")
    parser.add_argument(
        "--repeat", type=int, default=3, help="best of N runs for tokenizer and prepare rates"
    )
    return parser.parse_args()


def _tokenizer(texts: list[str], tmp: Path) -> Path:
    """The default embedded-corpus tokenizer (8,192 ids), trained once for the benchmark."""
    from herd.data.tokenizer import train_tokenizer

    return train_tokenizer(texts, 8192).save(tmp / "tokenizer")


def _raw(texts: list[str], tokenizer_dir: Path, processes: int, method: str) -> tuple[float, int]:
    """Raw single-threaded encode_batch tokens/s in ``processes`` processes at once, and the token count.

    Each process encodes an equal share of the texts; the rate is all tokens over the wall time
    of the slowest process, which measures what the cores of this machine deliver together.
    """
    shares = [texts[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("fork")
    with context.Pool(
        processes, initializer=_raw_init, initargs=(str(tokenizer_dir / "tokenizer.json"),)
    ) as pool:
        pool.map(_raw_encode, [(method, ["warm up"])] * processes)
        started = time.perf_counter()
        counts = pool.map(_raw_encode, [(method, share) for share in shares], chunksize=1)
        seconds = time.perf_counter() - started
    return sum(counts) / seconds, sum(counts)


_raw_tokenizer = None


def _raw_init(path: str) -> None:
    global _raw_tokenizer
    import tokenizers

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _raw_tokenizer = tokenizers.Tokenizer.from_file(path)


def _raw_encode(task: tuple[str, list[str]]) -> int:
    method, texts = task
    return sum(len(e.ids) for e in getattr(_raw_tokenizer, method)(texts, add_special_tokens=False))


def _prepare(corpus: Path, tokenizer_dir: Path, out: Path, num_proc: int) -> float:
    """herd.prepare tokens/s on a jsonl of the corpus with an existing tokenizer."""
    from herd.prepare import prepare

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "prepare.yaml")
    cfg.pop("hydra")
    cfg.merge_with(
        {
            "output_dir": str(out),
            "tokenizer": {"path": str(tokenizer_dir)},
            "num_proc": num_proc,
            "progress": False,
        }
    )
    cfg.sources = {"code": {"input": str(corpus)}}
    started = time.perf_counter()
    prepare(cfg)
    seconds = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["sources"]["code"]["tokens"] / seconds


def _read(prepared: Path, workers: int, batches: int) -> float:
    """PackedDataModule tokens/s (seq 512, batch 8), from loader creation to the last batch."""
    from herd.data.loaders.packed import PackedDataModule

    dm = PackedDataModule(str(prepared), seq_len=512, batch_size=8, num_workers=workers, shuffle_buffer=1000)
    started = time.perf_counter()
    tokens = 0
    for index, batch in enumerate(dm.train_dataloader()):
        tokens += batch["tokens"].numel()
        if index + 1 == batches:
            break
    return tokens / (time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
