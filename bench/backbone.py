"""Training-step throughput and memory of herd's backbone against transformers' LlamaForCausalLM.

Both models get the same config, the same weights and the same batches; one step is forward +
cross-entropy + backward + AdamW, under bf16 autocast on the CPU. herd is also timed with
``torch.compile``. Everything runs in this one process, so the ratios compare like with like.

    python bench/backbone.py                     # tiny preset, batch 4 x 512
    python bench/backbone.py --dim 512 --layers 8 --seq 1024 --no-compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common import PeakRSS
from herd.interop.hf import config_to_hf, hf_state_dict
from herd.model import ModelConfig, Transformer
from herd.presets import model_preset


def measure(name: str, logits_fn: Callable, params, batches, warmup: int) -> dict:
    """Median step time and peak memory of forward + loss + backward + AdamW steps."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=False)
    times = []
    with PeakRSS() as memory:
        for i, (tokens, targets) in enumerate(batches):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = logits_fn(tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens = batches[0][0].numel()
    print(f"  {name:<22} {tokens / step:>10,.0f} tok/s   step {step * 1000:7.1f} ms   "
          f"peak +{memory.delta_mib:7.1f} MiB   final loss {loss.item():.3f}", flush=True)
    return {"tok_s": tokens / step, "mem": memory.delta_mib}


def build_config(args) -> ModelConfig:
    config = model_preset(args.preset)
    overrides = {"dim": args.dim, "n_layers": args.layers, "vocab_size": args.vocab}
    values = {**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    values["max_seq_len"] = max(values["max_seq_len"], args.seq)
    values["attention"] = "sdpa"
    return ModelConfig(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the eager runs; keep each one's best")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = build_config(args)
    herd_model = Transformer(config).train()
    reference = LlamaForCausalLM._from_config(config_to_hf(config, dtype=torch.float32), attn_implementation="sdpa")
    missing, unexpected = reference.load_state_dict(hf_state_dict(herd_model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    reference.train()
    data = torch.randint(0, config.vocab_size, (args.steps, args.batch, args.seq + 1))
    batches = [(row[:, :-1].contiguous(), row[:, 1:].contiguous()) for row in data]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {config.num_params() / 1e6:.1f}M "
          f"params (dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size}); "
          f"batch {args.batch} x seq {args.seq}; bf16 autocast; forward+backward+AdamW")

    results: dict[str, dict] = {}
    runs = {"herd": ("herd (eager)", herd_model, herd_model.parameters),
            "hf": ("transformers (sdpa)", lambda t: reference(t).logits, reference.parameters)}
    for _ in range(args.rounds):  # alternating rounds: neither side profits from going second
        for key, (label, fn, params) in runs.items():
            result = measure(label, fn, params(), batches, args.warmup)
            best = results.setdefault(key, result)
            results[key] = {"tok_s": max(best["tok_s"], result["tok_s"]), "mem": min(best["mem"], result["mem"])}
    if not args.no_compile:
        compiled_model = Transformer(config).train()
        compiled_model.load_state_dict(herd_model.state_dict())
        compiled = torch.compile(compiled_model)
        results["compiled"] = measure("herd (torch.compile)", compiled, compiled_model.parameters(), batches,
                                      args.warmup + 2)
    hf = results["hf"]
    print(f"best of {args.rounds} rounds:")
    print(f"herd / transformers throughput: {results['herd']['tok_s'] / hf['tok_s']:.2f}x  "
          f"(peak memory {results['herd']['mem'] / max(hf['mem'], 1e-9):.2f}x)")
    if "compiled" in results:
        print(f"herd compiled / transformers throughput: {results['compiled']['tok_s'] / hf['tok_s']:.2f}x  "
              f"(peak memory {results['compiled']['mem'] / max(hf['mem'], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
