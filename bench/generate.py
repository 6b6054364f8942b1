"""Generation throughput of herd's ``generate`` against ``transformers``' ``generate``.

A random model of the tiny preset is saved with ``hf.save`` and loaded by both libraries from that
directory, so they run the same weights in the same dtype. Cases, each with the same prompts:

- batch 1: one prompt, greedy;
- batch 8, ragged: eight prompts of different lengths in one batch, greedy (transformers gets
  them left-padded with an attention mask);
- K=8 samples: eight samples of one prompt (herd: one prefill + ``num_samples=8``;
  transformers: ``num_return_sequences=8``), same temperature and top-p; tokens/s only.

Nothing stops early: the saved model names no eos token, so every row decodes
``--new-tokens`` tokens. Greedy outputs are compared token for token (OK / MISMATCH). herd runs
eagerly (the default) and with ``compile=True`` (``torch.compile`` of the decode step; its
compilation happens in the warm-up). Everything runs in this one process, alternating the
runners, best of ``--rounds``; the ratios are herd / transformers tokens per second.

    python bench/generate.py                  # fp32, 128 new tokens, 3 rounds
    python bench/generate.py --dtype bf16 --rounds 5 --no-compile
    python bench/generate.py --threads 1      # on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch

from herd.interop import hf
from herd.model import Transformer, generate
from herd.presets import model_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def left_padded(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input: prompts left-padded to one length, and the attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def best_time(fn: Callable[[], object], rounds: int) -> tuple[float, object]:
    """The fastest of ``rounds`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--no-compile", action="store_true", help="skip herd with compile=True")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a busy "
                        "machine 1 avoids stalls of parallel regions whose threads wait for a core")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, new = DTYPES[args.dtype], args.new_tokens
    config = model_preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="herd-bench-generate-") as model_dir:
        hf.save(Transformer(config), model_dir)  # no tokenizer: no eos, nothing stops early
        herd_model = hf.load(model_dir, dtype=dtype).eval()
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0

    vocab = config.vocab_size
    one = [torch.randint(0, vocab, (32,))]
    ragged = [torch.randint(0, vocab, (n,)) for n in (7, 12, 19, 26, 33, 40, 47, 54)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} preset "
          f"({config.num_params() / 1e6:.1f}M params, vocab {vocab}); {args.dtype}; {new} new tokens per row; "
          f"best of {args.rounds}")

    def herd_greedy(prompts, compile):
        return lambda: generate(herd_model, prompts, new, compile=compile)

    def hf_greedy(prompts):
        ids, mask = left_padded(prompts)

        def run():
            with torch.inference_mode():
                out = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                         do_sample=False)
            return out[:, ids.shape[1] :].tolist()

        return run

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": 0}

    def herd_samples(compile):
        return lambda: generate(herd_model, one, new, num_samples=8, seed=0, compile=compile, **sampling)

    def hf_samples():
        ids = one[0][None]
        with torch.inference_mode():
            out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=True, num_return_sequences=8, **sampling)
        return out[:, ids.shape[1] :].tolist()

    cases = [  # name, rows, {runner: function}, greedy
        ("batch 1", 1, {"herd": herd_greedy(one, False), "compiled": herd_greedy(one, True), "hf": hf_greedy(one)},
         True),
        ("batch 8 ragged", 8, {"herd": herd_greedy(ragged, False), "compiled": herd_greedy(ragged, True),
                               "hf": hf_greedy(ragged)}, True),
        ("K=8 samples", 8, {"herd": herd_samples(False), "compiled": herd_samples(True), "hf": hf_samples}, False),
    ]
    if args.no_compile:
        for case in cases:
            case[2].pop("compiled")
    start = time.perf_counter()
    for case in cases:  # warm-up: first calls allocate, pick kernels and compile
        for run in case[2].values():
            run()
    print(f"warm-up (with compilation) {time.perf_counter() - start:.0f} s")
    for name, rows, runs, greedy in cases:
        seconds: dict[str, float] = {}
        outputs: dict[str, object] = {}
        for _ in range(args.rounds):  # alternating: no runner profits from going last
            for key, run in runs.items():
                elapsed, outputs[key] = best_time(run, 1)
                seconds[key] = min(seconds.get(key, float("inf")), elapsed)
        assert all(len(row) == new for out in outputs.values() for row in out), "a row stopped early"
        tps = {key: rows * new / s for key, s in seconds.items()}
        line = f"  {name:<15} transformers {tps['hf']:>7,.0f} tok/s   herd {tps['herd']:>7,.0f} tok/s " \
               f"({tps['herd'] / tps['hf']:4.2f}x)"
        if "compiled" in tps:
            line += f"   herd compiled {tps['compiled']:>7,.0f} tok/s ({tps['compiled'] / tps['hf']:4.2f}x)"
        if greedy:
            same = all(outputs[key] == outputs["hf"] for key in runs)
            line += "   greedy outputs " + ("OK" if same else "MISMATCH")
        print(line, flush=True)

if __name__ == "__main__":
    main()
