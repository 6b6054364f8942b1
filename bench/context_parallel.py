"""Per-rank activation memory of one training step under context parallelism: CP = 1, 2, 4 in one run.

The tiny preset (dim 256, 4 layers, GQA 8/2 heads, vocab 8,192) on one row of ``--seq`` tokens
(8K by default) packed with documents of random lengths, fp32, forward + backward of herd's
next-token loss on CPU processes joined by gloo. Each CP size runs in its own ``size`` processes,
one after the other; every rank reports:

- **saved activations**: the bytes autograd keeps for the backward (every saved tensor, each
  storage once) - the activation memory that CP divides;
- **peak RSS**: the rise of the process's resident memory during the step (activations, the
  gathered K/V, the mask, the gradients and the allocator's slack);
- the step's time, and the time spent in the all-gather of K/V and its backward's reduce-scatter
  (gloo, on this machine's cores: ranks share 2 cores, so times are for the ratio, not speed).

Printed: each size's worst rank, and its ratio to CP=1. Target: saved activations at CP=2
<= 0.6x those at CP=1 (the ideal is 1/CP, plus the whole row's K/V and mask on every rank).

    python bench/context_parallel.py
    python bench/context_parallel.py --seq 4096 --sizes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import PeakRSS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(seq: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=generator)
    document_ids = torch.zeros(1, seq, dtype=torch.long)
    for cut in sorted(torch.randint(1, seq, (seq // 1024,), generator=generator).tolist()):
        document_ids[0, cut:] += 1
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "document_ids": document_ids}


class CollectiveClock:
    """Times the collectives that context parallelism calls (patched into herd.model.context)."""

    def __init__(self) -> None:
        from herd.model import context

        self.seconds = 0.0
        self.calls = 0
        for name in ("_all_gather", "_reduce_scatter"):
            setattr(context, name, self._timed(getattr(context, name)))

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return result
        return timed


def _rank(rank: int, size: int, port: int, seq: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    clock = CollectiveClock()
    from herd.model import Transformer
    from herd.model.context import ContextParallel
    from herd.model.loss import next_token_loss
    from herd.presets import model_preset

    torch.manual_seed(0)
    config = model_preset("tiny")
    model = Transformer(config)
    model.set_context(max_seq_len=seq)
    batch = _row(seq, config.vocab_size)
    context = ContextParallel(dist.group.WORLD) if size > 1 else None

    def step() -> tuple[int, float]:
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _ = next_token_loss(model, batch, context=context)
        loss.backward()
        return sum(saved.values()), time.perf_counter() - start

    step()  # warm-up
    dist.barrier()
    results = []
    for _ in range(steps):
        clock.seconds = 0.0
        with PeakRSS() as memory:
            saved_bytes, seconds = step()
        results.append({"saved": saved_bytes, "rss_mib": memory.delta_mib, "seconds": seconds,
                        "collective": clock.seconds})
        dist.barrier()
    best = min(results, key=lambda r: r["seconds"])
    best["rss_mib"] = min(r["rss_mib"] for r in results)
    Path(out, f"{size}-{rank}.json").write_text(json.dumps(best))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=8192, help="tokens in the row")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="context-parallel sizes")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per size (after one warm-up)")
    args = parser.parse_args()
    print(f"tiny preset, one row of {args.seq} tokens with document masks, fp32, gloo on {os.cpu_count()} cores")
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for size in args.sizes:
            torch.multiprocessing.spawn(_rank, args=(size, _free_port(), args.seq, args.steps, out), nprocs=size)
            ranks = [json.loads(Path(out, f"{size}-{r}.json").read_text()) for r in range(size)]
            rows[size] = {"saved": max(r["saved"] for r in ranks) / 2**20, "rss": max(r["rss_mib"] for r in ranks),
                          "seconds": max(r["seconds"] for r in ranks),
                          "share": max(r["collective"] / r["seconds"] for r in ranks)}
    base = rows[args.sizes[0]]
    print(f"{'CP':>3} {'saved act. MiB':>15} {'x CP=' + str(args.sizes[0]):>8} {'peak RSS MiB':>13} "
          f"{'x':>6} {'step s':>7} {'all-gather share':>17}")
    for size, row in rows.items():
        print(f"{size:>3} {row['saved']:>15.1f} {row['saved'] / base['saved']:>8.2f} {row['rss']:>13.1f} "
              f"{row['rss'] / base['rss']:>6.2f} {row['seconds']:>7.2f} {row['share']:>16.1%}")
    if 1 in rows and 2 in rows:
        ratio = rows[2]["saved"] / rows[1]["saved"]
        print(f"saved activations at CP=2: {ratio:.2f}x CP=1 (target <= 0.6x): {'met' if ratio <= 0.6 else 'MISSED'}")


if __name__ == "__main__":
    main()
