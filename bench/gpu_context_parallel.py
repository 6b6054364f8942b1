"""Context parallelism on GPUs: a 1B-class model at 32K to 128K tokens with CP = 1, 2, 4 (not a test).

For each row length and each CP size that the GPUs allow, ``size`` processes (NCCL) train one
row of that length packed with documents: the Llama 3.2 1B preset, bf16 autocast, FlexAttention
block masks, activation checkpointing of every block, herd's chunked next-token loss and AdamW,
with the weights replicated (CP alone; FSDP2 over the same ranks is what training adds).
Reported per run: tokens/s of the whole group and per GPU, and the peak GPU memory of the worst
rank; a run that does not fit prints OOM.

    python bench/gpu_context_parallel.py                                  # 32K, 64K, 128K x CP 1, 2, 4
    python bench/gpu_context_parallel.py --lengths 131072 --sizes 2 4
    python bench/gpu_context_parallel.py --device cpu --preset tiny --lengths 1024 --sizes 1 2   # a dry run
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, args: argparse.Namespace, seq: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    from herd.model import Transformer
    from herd.model.context import ContextParallel
    from herd.model.loss import next_token_loss
    from herd.presets import model_preset
    from herd.stages.parallelize import apply_activation_checkpointing

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    config = model_preset(args.preset)
    torch.manual_seed(0)
    with device:
        model = Transformer(config)
    model.set_context(max_seq_len=seq, attention="flex" if cuda else "sdpa")
    apply_activation_checkpointing(model, "full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, seq + 1), generator=generator)
    documents = torch.zeros(1, seq, dtype=torch.long)
    for cut in sorted(torch.randint(1, seq, (seq // 8192,), generator=generator).tolist()):
        documents[0, cut:] += 1
    batch = {"tokens": tokens[:, :-1].to(device), "targets": tokens[:, 1:].to(device),
             "document_ids": documents.to(device)}
    context = ContextParallel(dist.group.WORLD) if size > 1 else None
    result: dict[str, float | str] = {}
    try:
        times = []
        for step in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _ = next_token_loss(model, batch, context=context)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        seconds = sum(times) / len(times)
        result = {"seconds": seconds, "tokens_per_s": seq / seconds,
                  "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")}
    except torch.OutOfMemoryError:
        result = {"error": "OOM"}
    Path(out, f"{seq}-{size}-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3_2_1b", help="model preset (configs/model/)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (FlexAttention compiles)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else max(args.sizes)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" and gpus else "CPU"
    print(f"{args.preset}, one packed row per step, bf16 autocast, activation checkpointing, {gpus} x {name}")
    print(f"{'tokens':>8} {'CP':>3} {'tokens/s':>10} {'per GPU':>9} {'step s':>7} {'peak GiB':>9}")
    with tempfile.TemporaryDirectory() as out:
        for seq in args.lengths:
            for size in args.sizes:
                if size > gpus:
                    print(f"{seq:>8} {size:>3}   skipped: {gpus} GPU(s)")
                    continue
                torch.multiprocessing.spawn(_rank, args=(size, _free_port(), args, seq, out), nprocs=size)
                ranks = [json.loads(Path(out, f"{seq}-{size}-{r}.json").read_text()) for r in range(size)]
                if any("error" in r for r in ranks):
                    print(f"{seq:>8} {size:>3}   OOM")
                    continue
                seconds = max(r["seconds"] for r in ranks)
                peak = max(r["peak_gib"] for r in ranks)
                print(f"{seq:>8} {size:>3} {seq / seconds:>10.0f} {seq / seconds / size:>9.0f} {seconds:>7.2f} "
                      f"{peak:>9.1f}")


if __name__ == "__main__":
    main()
