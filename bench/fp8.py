"""FP8 row-wise FFN quantization (``herd.model.quantize``) against bf16, measured in one run.

For each model shape a random bf16 model is built and a copy of it is quantized with
``quantize_fp8_rowwise`` (FFN of every block but the first and the last). Reported per shape:

- weight memory: bytes of the FFN weights (with their scales) and of the whole model;
- prefill tokens/s: one forward over a (batch, prompt) block;
- decode tokens/s: greedy ``generate`` of ``--new-tokens`` tokens minus a 1-token run (the
  prefill), per decoded token;
- ratios fp8 / bf16; the runners alternate, best of ``--rounds``.

Quality: with ``--model-dir`` (an exported model) and ``--data-dir`` (a prepared folder with a
val split), the val perplexity of that model in bf16 and with FP8 FFNs, on the same batches.

    python bench/fp8.py                                 # CPU: tiny preset and a dim-1024 shape
    python bench/fp8.py --model-dir logs/pretrain/runs/<run>/export --data-dir data/prepared/stdlib
    python bench/fp8.py --device cuda                   # tiny and the Llama 3.2 1B shape

On a CPU the FP8 kernels have no hardware support: expect the memory saving, not a speed-up.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from herd.model import Float8RowwiseLinear, ModelConfig, Transformer, generate, quantize_fp8_rowwise
from herd.presets import model_preset

# A shape that still runs in a minute or two on a 2-core CPU.
CPU_LARGE = ModelConfig(dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, vocab_size=16384, multiple_of=256,
                        max_seq_len=2048, tie_embeddings=True)


def shapes(device: str) -> dict[str, ModelConfig]:
    """The model shapes measured on ``device``: tiny, and a larger one it can run quickly."""
    tiny = model_preset("tiny")
    if device == "cpu":
        return {"tiny": tiny, "dim1024x6": CPU_LARGE}
    big = dataclasses.replace(model_preset("llama3_2_1b"), attention="sdpa", max_seq_len=4096)
    return {"tiny": tiny, "llama3_2_1b": big}


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (tied tensors once; RoPE tables left out)."""
    seen, total = set(), 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if "rope." in name or name.startswith("rope") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def ffn_bytes(model: Transformer) -> int:
    return sum(tensor_bytes(block.feed_forward) for block in model.layers)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[Transformer], object], model: Transformer, device: str) -> float:
    """Seconds of one ``fn(model)`` call."""
    sync(device)
    start = time.perf_counter()
    fn(model)
    sync(device)
    return time.perf_counter() - start


def speed(models: dict[str, Transformer], args, device: str) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s of each model, runners alternating, best of ``args.rounds``."""
    vocab = next(iter(models.values())).config.vocab_size
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), device=device)
    rows = [row for row in prompts]
    runs = {
        "prefill": lambda m: m(prompts),
        "generate": lambda m: generate(m, rows, args.new_tokens),
        "generate1": lambda m: generate(m, rows, 1),
    }
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            for run in runs.values():
                run(model)
        for _ in range(args.rounds):
            for name, model in models.items():
                for key, run in runs.items():
                    best[name][key] = min(best[name].get(key, math.inf), timed(run, model, device))
    out = {}
    for name, t in best.items():
        decode_s = max(t["generate"] - t["generate1"], 1e-9)
        out[name] = {"prefill": args.batch * args.prompt_len / t["prefill"],
                     "decode": args.batch * (args.new_tokens - 1) / decode_s}
    return out


def perplexity(model: Transformer, batches: list[dict[str, torch.Tensor]], device: str) -> float:
    """exp(mean next-token loss) over ``batches``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["tokens"].to(device), document_ids=batch["document_ids"].to(device))
            targets = batch["targets"].to(device)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="sum")
            total += loss.item()
            count += int((targets != -100).sum())
    return math.exp(total / count)


def quality(args, device: str) -> None:
    if not (args.model_dir and args.data_dir):
        print("perplexity: skipped (pass --model-dir <exported model> --data-dir <prepared folder>)")
        return
    from herd.data.loaders.packed import PackedDataModule
    from herd.interop import hf

    bf16 = hf.load(args.model_dir, dtype=torch.bfloat16, device=device).eval()
    fp8 = quantize_fp8_rowwise(copy.deepcopy(bf16))
    data = PackedDataModule(args.data_dir, seq_len=args.seq_len, batch_size=args.eval_batch, num_workers=0,
                            expected_vocab_size=bf16.config.vocab_size)
    batches = []
    for batch in data.val_dataloader():
        batches.append(batch)
        if len(batches) == args.val_batches:
            break
    tokens = sum(int((b["targets"] != -100).sum()) for b in batches)
    ppl_bf16, ppl_fp8 = perplexity(bf16, batches, device), perplexity(fp8, batches, device)
    n_fp8 = sum(isinstance(block.feed_forward.w1, Float8RowwiseLinear) for block in fp8.layers)
    print(f"perplexity on {tokens:,} val tokens of {args.data_dir} ({len(batches)} batches x {args.eval_batch} x "
          f"{args.seq_len}), {args.model_dir} ({bf16.config.n_layers} blocks, {n_fp8} with FP8 FFN):")
    print(f"  bf16 {ppl_bf16:.4f}   fp8 {ppl_fp8:.4f}   fp8 / bf16 {ppl_fp8 / ppl_bf16:.4f} "
          f"({100 * (ppl_fp8 / ppl_bf16 - 1):+.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--model-dir", help="an exported model: compute val perplexity bf16 vs fp8")
    parser.add_argument("--data-dir", help="a prepared folder whose val split is scored")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--val-batches", type=int, default=16)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; best of {args.rounds}")
    quality(args, device)
    for name, config in shapes(device).items():
        torch.manual_seed(0)
        with torch.device(device):
            bf16 = Transformer(config).to(torch.bfloat16).eval()
        fp8 = quantize_fp8_rowwise(copy.deepcopy(bf16))
        start = time.perf_counter()
        tps = speed({"bf16": bf16, "fp8": fp8}, args, device)
        mib = 2**20
        print(f"{name} ({config.num_params() / 1e6:.0f}M params, {config.n_layers} blocks, dim {config.dim}, "
              f"ffn {config.ffn_hidden_dim}), measured in {time.perf_counter() - start:.0f} s:")
        print(f"  FFN weights   bf16 {ffn_bytes(bf16) / mib:8.1f} MiB   fp8 {ffn_bytes(fp8) / mib:8.1f} MiB   "
              f"({ffn_bytes(fp8) / ffn_bytes(bf16):.2f}x)")
        print(f"  whole model   bf16 {tensor_bytes(bf16) / mib:8.1f} MiB   fp8 {tensor_bytes(fp8) / mib:8.1f} MiB   "
              f"({tensor_bytes(fp8) / tensor_bytes(bf16):.2f}x)")
        for key in ("prefill", "decode"):
            print(f"  {key:<8} tok/s bf16 {tps['bf16'][key]:10,.0f}   fp8 {tps['fp8'][key]:10,.0f}   "
                  f"(fp8/bf16 {tps['fp8'][key] / tps['bf16'][key]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
