"""Peak memory of one long-context training step: naive vs chunked loss vs activation checkpointing.

A small backbone (dim 256, 2 layers) with Llama 3's 128,256-token vocabulary, batch 1, bf16
autocast, forward + backward on the CPU. At long sequences the (seq x vocab) logits dominate the
naive step (whole logits, written out here: herd's own loss no longer has such a path); the
chunked cross-entropy never holds them whole. Ratios are against the naive step at the same
length, measured in this process.

    python bench/long_context.py                          # lengths 1024..8192
    python bench/long_context.py --lengths 2048 16384 --chunk 2048
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import PeakRSS
from herd.model import ModelConfig, Transformer
from herd.model.loss import next_token_loss
from herd.stages.parallelize import apply_activation_checkpointing

VARIANTS = {"naive": (None, "none"), "chunked": ("chunk", "none"), "checkpointed": (None, "full"),
            "chunked+checkpointed": ("chunk", "full")}


def step_peak(model: Transformer, seq_len: int, chunk_size: int | None) -> tuple[float, float]:
    """Peak resident memory above the start (MiB) and seconds of one forward + backward."""
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len + 1))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "document_ids": torch.zeros(1, seq_len, dtype=torch.long)}
    model.zero_grad(set_to_none=True)
    with PeakRSS() as memory:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunk_size is None:  # the naive step: (seq, vocab) logits, upcast whole
                logits = model(batch["tokens"], document_ids=batch["document_ids"])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
            else:
                loss, _ = next_token_loss(model, batch, chunk_size)
        loss.backward()
        seconds = time.perf_counter() - start
    return memory.delta_mib, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunk", type=int, default=1024, help="positions per loss chunk")
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=args.vocab, multiple_of=64,
                         max_seq_len=max(args.lengths))
    models = {}
    for setting in ("none", "full"):
        models[setting] = Transformer(config)
        apply_activation_checkpointing(models[setting], setting)
    models["full"].load_state_dict(models["none"].state_dict())
    print(f"dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size:,}; batch 1; bf16 autocast; "
          f"forward + backward; loss chunk {args.chunk} positions; peak RSS above the start")
    print(f"{'seq':>7} " + " ".join(f"{name:>22}" for name in VARIANTS))
    for seq_len in args.lengths:
        results = {}
        for name, (chunk, setting) in VARIANTS.items():
            results[name] = step_peak(models[setting], seq_len, args.chunk if chunk else None)
        naive = results["naive"][0]
        cells = [f"{mib:8.0f} MiB {mib / naive:5.2f}x" for mib, _ in results.values()]
        print(f"{seq_len:>7} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print(f"target: chunked peak <= 0.25x naive at the longest length; "
          f"measured {results['chunked'][0] / results['naive'][0]:.2f}x "
          f"(with checkpointing {results['chunked+checkpointed'][0] / results['naive'][0]:.2f}x)")


if __name__ == "__main__":
    main()
