"""Training throughput alone and beside a competing CPU-bound process: herd's thread choice against torch's default.

The training is the tiny preset's pretraining step as ``make train`` takes it (``--batch`` rows of
``--seq`` tokens, bf16 autocast, herd's next-token loss, backward, AdamW), in a process of its own
started with one of two thread settings:

- herd: :func:`herd.threads.choose` for one rank, as ``herd.train`` applies it for ``make train``:
  the cores other processes keep busy at the start are left to them, and ``--workers`` media loader
  workers get a core each (0: ``make train``'s loader reads packed token shards, which takes none);
- default: torch's own choice (one thread per core of the machine).

Each setting runs alone, then beside a competitor, started before and stopped after: by default
another process running float32 matmuls with torch's default threads (another training job, say);
``--competitor python`` is a single-threaded pure-Python busy loop instead. The four runs
alternate for ``--rounds`` rounds and each keeps its best (a shared machine's other load comes and
goes). Reported per run: tokens/s over ``--steps`` steps after one warm-up step; then, per setting,
beside / alone, and herd against the default beside the competitor. Target: herd's choice beside the competitor
at most 2.5x slower than alone, printed against both herd's choice alone and torch's default alone
(today's ``make train`` alone). Every run starts from a clean environment (no
OMP_NUM_THREADS), one at a time, in this one invocation.

    python bench/contention.py
    python bench/contention.py --steps 5 --workers 1     # as if the loader decoded media
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TRAINER = r"""
import json, sys, time
import torch
from herd import threads
from herd.model import Transformer
from herd.model.loss import next_token_loss
from herd.presets import model_preset

setting, workers, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if setting == "herd":
    threads.apply(threads.choose(workers=workers, devices=1))
torch.manual_seed(0)
model = Transformer(model_preset("tiny"))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "document_ids": torch.zeros(batch, seq, dtype=torch.long)}

def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = next_token_loss(model, data)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

step()  # warm-up
start = time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - start
print(json.dumps({"threads": torch.get_num_threads(), "tokens_per_s": steps * batch * seq / seconds}))
"""

COMPETITORS = {
    "torch": "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    b = a @ a\n",
    "python": "while True:\n    pass\n",
}


def clean_env() -> dict[str, str]:
    """This environment without thread settings, so that each process makes its own choice."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def train(setting: str, args) -> dict[str, float]:
    command = [sys.executable, "-c", TRAINER, setting, str(args.workers), str(args.batch), str(args.seq),
               str(args.steps)]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def beside_competitor(setting: str, args) -> dict[str, float]:
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]], env=clean_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)  # the competitor is busy before the training starts
        return train(setting, args)
    finally:
        competitor.terminate()
        competitor.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="media loader workers herd's choice leaves a core")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="torch")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"tiny preset, {args.batch} x {args.seq} tokens per step, bf16 autocast; {cores} cores in the affinity "
          f"mask; load average {os.getloadavg()[0]:.1f} at the start; competitor: "
          + ("a float32 matmul loop with torch's default threads" if args.competitor == "torch"
             else "a single-threaded Python busy loop"), flush=True)
    results: dict[tuple[str, str], dict[str, float]] = {}
    for round_ in range(args.rounds):
        for setting in ("herd", "default"):
            for where, run in (("alone", train), ("beside", beside_competitor)):
                r = run(setting, args)
                print(f"round {round_ + 1} {setting:>8} {where:>7}: {r['threads']} thread(s)  {r['tokens_per_s']:8.0f} "
                      f"tokens/s  (load average {os.getloadavg()[0]:.1f})", flush=True)
                best = results.get((setting, where))
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    results[setting, where] = r
    for (setting, where), r in results.items():
        print(f"best {setting:>8} {where:>7}: {r['tokens_per_s']:8.0f} tokens/s")
    for setting in ("herd", "default"):
        alone, beside = (results[setting, w]["tokens_per_s"] for w in ("alone", "beside"))
        print(f"{setting:>8}: beside the competitor {alone / beside:.2f}x slower than alone")
    herd, default = (results[s, "beside"]["tokens_per_s"] for s in ("herd", "default"))
    print(f"beside the competitor: herd's choice {herd / default:.2f}x the default's tokens/s; alone: "
          f"{results['herd', 'alone']['tokens_per_s'] / results['default', 'alone']['tokens_per_s']:.2f}x")
    slowdown = results["herd", "alone"]["tokens_per_s"] / herd
    today = results["default", "alone"]["tokens_per_s"] / herd
    print(f"target: herd's choice at most 2.5x slower beside the competitor than alone; got {slowdown:.2f}x against "
          f"herd's choice alone, {today:.2f}x against torch's default alone")


if __name__ == "__main__":
    main()
