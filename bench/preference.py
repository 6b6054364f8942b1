"""Preference steps: shared-prompt rows against separate rows; DPO memory and speed at Llama 3's vocabulary.

**Layout** (``--parts layout``). A preference set whose prompts are long relative to the responses
(``--prompt`` tokens against ``--response`` tokens, 2 responses per prompt, lengths varying by up
to ±25%) is encoded two ways:

- shared: one row per prompt, ``[prompt][chosen][rejected]`` (herd's layout; each response
  attends to the prompt and itself, see ``herd.model.attention``), padded to the batch's longest;
- separate: the same pairs as two rows, ``[prompt][chosen]`` and ``[prompt][rejected]``, padded to
  the batch's longest (what pairwise trainers feed a model).

Each step is a forward pass, the summed log-probs of every response
(``herd.stages.preference.response_logps``), the DPO loss and a backward pass, on the tiny
preset (or ``--preset``). Both layouts must give the same log-probs (checked: OK / MISMATCH).
Reported per layout, best of ``--rounds``: step time, responses/s and tokens/s, where tokens are
the pairs' tokens as separately encoded (the same work for both), and the peak resident memory
above the start of the step; then the ratios shared / separate. Runs alternate in one process.

**Memory** (``--parts memory``). A DPO step (forward, response log-probs, DPO loss + 0.2 x the
chosen tokens' NLL, backward) at a vocabulary of ``--vocab`` (128,256) with a small backbone
(``--dim``), on one row of L tokens for each L of ``--lengths``: a prompt of L/2 tokens, then two
responses of L/4. herd's path (the output layer on the scored positions only, in chunks whose
backward recomputes them) against today's full-logit path, written out here as herd had it:
``model(...)`` gives (L, vocab) logits, upcast to float32 whole for the cross-entropy. Peak memory is the peak
resident memory above the start of the step, each step in a fresh process. The full-logit step
runs only where ~4 float32 (L, vocab) buffers fit in ``--memory-share`` (half) of the memory available now; where they
do not (8K at 128,256 needs ~16 GiB), its peak is estimated as herd's step at that length plus the
full-logit step's excess over herd's measured at the longest length that ran, scaled by the
length ratio (the excess is the (L, vocab) buffers: linear in L). The line says which.

Ratio herd / full-logit per length; target <= 0.25x at 8K.

**Speed** (``--parts speed``). On the same vocabulary and backbone, ``--speed-rows`` rows of
``--speed-length`` tokens laid out as above: a DPO step whose reference log-probs were precomputed
(looked up by row, as ``stage.reference=precompute`` does) against an SFT step (the next-token
loss on the same targets, the responses' content) on the same rows. tokens/s (real tokens of the
rows), best of ``--rounds``, alternating; target DPO >= 0.9x SFT.

    python bench/preference.py                      # all three parts
    python bench/preference.py --parts memory --lengths 2048 8192 --dim 128
    python bench/preference.py --parts memory --memory-share 0.9    # measure the 8K full-logit step (~17 GiB)
    python bench/preference.py --parts layout --prompt 768 --response 32 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import time

import torch
import torch.nn.functional as F

from common import PeakRSS
from herd.model import ModelConfig, Transformer
from herd.model.loss import next_token_loss
from herd.presets import model_preset
from herd.stages.dpo import dpo_loss, row_key
from herd.stages.preference import best_ranked, find_responses, ranked_pairs, response_logps

IGNORE = -100


def make_pairs(n: int, prompt: int, response: int, vocab: int, seed: int) -> list[tuple[list[int], list[list[int]]]]:
    """``n`` prompts with two responses each; lengths vary by up to ±25%."""
    rng = random.Random(seed)

    def ids(length: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(max(2, round(length * rng.uniform(0.75, 1.25))))]

    return [(ids(prompt), [ids(response), ids(response)]) for _ in range(n)]


def encode(rows: list[list[tuple[list[int], list[list[int]]]]]) -> dict[str, torch.Tensor]:
    """A preference batch: each row holds groups of (prompt, responses); every response token but the
    first is a target (the first stands in for the chat header)."""
    seq = max(sum(len(p) + sum(len(r) for r in rs) for p, rs in row) for row in rows)
    batch = {key: torch.zeros(len(rows), seq, dtype=torch.long) for key in ("tokens", "document_ids", "response_ids")}
    batch["ranks"] = torch.full((len(rows), seq), -1, dtype=torch.long)
    batch["targets"] = torch.full((len(rows), seq), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for doc, (prompt, responses) in enumerate(row):
            batch["tokens"][b, at : at + len(prompt)] = torch.tensor(prompt)
            batch["document_ids"][b, at : at + len(prompt)] = doc
            at += len(prompt)
            for k, response in enumerate(responses, start=1):
                end = at + len(response)
                batch["tokens"][b, at:end] = torch.tensor(response)
                batch["document_ids"][b, at:end] = doc
                batch["response_ids"][b, at:end] = k
                batch["ranks"][b, at:end] = k - 1
                batch["targets"][b, at : end - 1] = torch.tensor(response[1:])
                at = end
        batch["document_ids"][b, at:] = len(row)  # padding: a document of its own
    return batch


def step(model: Transformer, batch: dict[str, torch.Tensor], separate: bool) -> torch.Tensor:
    """Forward, log-probs, DPO loss (reference = the policy's own detached log-probs), backward."""
    responses = find_responses(batch)
    hidden = model.hidden_states(batch["tokens"], document_ids=batch["document_ids"], response_ids=batch["response_ids"])
    logps, _ = response_logps(hidden, model.output.weight, batch["targets"], responses.token_response, responses.count)
    if separate:  # rows 2i and 2i+1 hold the chosen and the rejected of pair i
        better, worse = torch.arange(0, responses.count, 2), torch.arange(1, responses.count, 2)
    else:
        better, worse = ranked_pairs(responses.ranks, responses.groups)
    losses, _, _ = dpo_loss(logps[better], logps[worse], logps[better].detach(), logps[worse].detach(), 0.1)
    losses.mean().backward()
    model.zero_grad(set_to_none=True)
    return logps.detach()


def layout(args) -> None:
    """Shared-prompt rows against separate rows (see the module docstring)."""
    torch.manual_seed(0)
    model = Transformer(model_preset(args.preset))
    pairs = make_pairs(args.batch, args.prompt, args.response, model.config.vocab_size, seed=0)
    shared = encode([[group] for group in pairs])
    separate = encode([[(prompt, [response])] for prompt, responses in pairs for response in responses])
    work_tokens = sum(2 * len(p) + sum(len(r) for r in rs) for p, rs in pairs)
    print(f"== layout: torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} preset; {args.batch} "
          f"prompts of ~{args.prompt} tokens, 2 responses of ~{args.response}; shared rows "
          f"{tuple(shared['tokens'].shape)}, separate rows {tuple(separate['tokens'].shape)}; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}")

    results: dict[str, tuple[float, float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, batch in (("shared", shared), ("separate", separate)):
            with PeakRSS() as memory, torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                start = time.perf_counter()
                outputs[name] = step(model, batch, separate=name == "separate")
                seconds = time.perf_counter() - start
            best = results.get(name, (float("inf"), 0.0))
            results[name] = (min(best[0], seconds), max(best[1], memory.delta_mib))
    tolerance = 5e-2 if args.bf16 else 1e-3
    same = torch.allclose(outputs["shared"], outputs["separate"], atol=tolerance, rtol=1e-4)
    for name, (seconds, mib) in results.items():
        print(f"{name:>9}: {seconds * 1000:8.1f} ms/step  {2 * args.batch / seconds:8.1f} responses/s  "
              f"{work_tokens / seconds:9.0f} tokens/s  peak +{mib:7.1f} MiB")
    (shared_s, shared_mib), (separate_s, separate_mib) = results["shared"], results["separate"]
    print(f"shared / separate: {separate_s / shared_s:.2f}x tokens/s, {shared_mib / max(separate_mib, 1e-9):.2f}x "
          f"peak memory; log-probs {'OK' if same else 'MISMATCH'}")


# --------------------------------------------------------------------------- memory and speed


def big_vocab_config(args, max_len: int) -> ModelConfig:
    """A small backbone with a large vocabulary (untied, like Llama 3 8B): the output layer is what matters."""
    return ModelConfig(dim=args.dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=args.vocab, multiple_of=64,
                       max_seq_len=max_len)


def preference_group(length: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    """The content of one row of ``length`` tokens: a prompt of length/2, then two responses of length/4
    (ranks 0, 1)."""
    generator = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [generator.randrange(10, vocab) for _ in range(n)]

    return [(ids(length // 2), [ids(length // 4), ids(length - length // 2 - length // 4)])]


def preference_row(length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-row batch of :func:`preference_group`."""
    return encode([preference_group(length, vocab, seed)])


def full_logit_response_logps(logits, targets, token_response, count):
    """Today's path, as herd had it: (batch, seq, vocab) logits upcast whole, cross-entropy per position."""
    scored = targets != IGNORE
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                   reduction="none").view_as(targets)
    index = token_response[scored]
    sums = token_logps.new_zeros(count).index_add(0, index, token_logps[scored])
    tokens = torch.zeros(count, dtype=torch.long, device=targets.device).index_add(0, index, torch.ones_like(index))
    return sums, tokens


def dpo_step(model: Transformer, batch: dict[str, torch.Tensor], full_logits: bool = False,
             reference: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One DPO step as stage=dpo takes it (pair term + 0.2 x chosen NLL), backward included. ``reference``:
    precomputed log-probs by row key (None: the policy's own, detached)."""
    responses = find_responses(batch)
    kwargs = {"document_ids": batch["document_ids"], "response_ids": batch["response_ids"]}
    if full_logits:
        logits = model(batch["tokens"], **kwargs)  # (batch, seq, vocab)
        logps, tokens = full_logit_response_logps(logits, batch["targets"], responses.token_response, responses.count)
    else:
        hidden = model.hidden_states(batch["tokens"], **kwargs)  # (batch, seq, dim)
        logps, tokens = response_logps(hidden, model.output.weight, batch["targets"], responses.token_response,
                                       responses.count)
    if reference is None:
        ref = logps.detach()
    else:
        rows = responses.rows.tolist()
        ref = torch.cat([reference[row_key(batch["tokens"][r], batch["response_ids"][r])]
                         for r in sorted(set(rows))])
    better, worse = ranked_pairs(responses.ranks, responses.groups)
    losses, _, _ = dpo_loss(logps[better], logps[worse], ref[better], ref[worse], 0.1)
    chosen = best_ranked(responses)
    loss = losses.mean() + 0.2 * (-logps[chosen].sum() / tokens[chosen].sum())
    loss.backward()
    return loss.detach()


def _measured_peak_mib(args, length: int, full_logits: bool) -> float:
    """The step's peak resident memory above its start (MiB); run in a fresh process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(big_vocab_config(args, length))
    batch = preference_row(length, args.vocab)
    for param in model.parameters():  # gradients exist before the step, as after the first one
        param.grad = torch.zeros_like(param)
    with PeakRSS() as memory, torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        dpo_step(model, batch, full_logits)
    return memory.delta_mib


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 1024


def memory(args) -> None:
    """DPO step peak memory at a large vocabulary, herd's path against the full-logit one."""
    print(f"== memory: DPO step at vocab {args.vocab:,}, dim {args.dim}, 2 layers; one row per length (prompt 1/2, "
          f"two responses 1/4 each); {'bf16 autocast' if args.bf16 else 'fp32'}; peak RSS above the step's start, "
          "each in a fresh process")
    spawn = multiprocessing.get_context("spawn")
    measured: dict[tuple[int, str], float] = {}
    ratios = {}
    for length in sorted(args.lengths):
        with spawn.Pool(1) as pool:
            herd = measured[length, "herd"] = pool.apply(_measured_peak_mib, (args, length, False))
        need = herd + 16 * length * args.vocab / 2**20  # ~4 float32 (length, vocab) buffers live at once
        full, how = None, "measured"
        if need < args.memory_share * available_mib():
            with spawn.Pool(1) as pool:
                full = measured[length, "full-logit"] = pool.apply(_measured_peak_mib, (args, length, True))
        else:  # too big for this machine now: herd's step plus the logit excess of the longest run, scaled
            known = [n for n in sorted(args.lengths) if (n, "full-logit") in measured]
            if known:
                n = known[-1]
                full = herd + length / n * (measured[n, "full-logit"] - measured[n, "herd"])
                how = f"estimated: not run (needs ~{need / 1024:.0f} GiB), herd's step + {length / n:g}x the logit " \
                      f"excess measured at {n}"
        shown = f"{full:8.0f} MiB ({how})" if full is not None else "not run"
        print(f"{length:>6} tokens: herd {herd:8.0f} MiB   full-logit {shown}", flush=True)
        if full is not None:
            ratios[length] = herd / full
            print(f"{length:>6} tokens: herd / full-logit {herd / full:.3f}x")
    longest = max(args.lengths)
    if longest in ratios:
        print(f"target: herd / full-logit <= 0.25x at {longest} tokens; got {ratios[longest]:.3f}x")


def speed(args) -> None:
    """DPO (precomputed reference) against SFT on the same rows: tokens/s."""
    torch.manual_seed(0)
    model = Transformer(big_vocab_config(args, args.speed_length))
    batch = encode([preference_group(args.speed_length, args.vocab, seed=row) for row in range(args.speed_rows)])
    tokens = int((batch["document_ids"] == 0).sum())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):  # the precompute pass
        responses = find_responses(batch)
        hidden = model.hidden_states(batch["tokens"], document_ids=batch["document_ids"],
                                     response_ids=batch["response_ids"])
        logps, _ = response_logps(hidden, model.output.weight, batch["targets"], responses.token_response,
                                  responses.count)
    reference = {row_key(batch["tokens"][r], batch["response_ids"][r]): logps[responses.rows == r]
                 for r in range(len(batch["tokens"]))}
    print(f"== speed: vocab {args.vocab:,}, dim {args.dim}; {args.speed_rows} rows of {args.speed_length} tokens "
          f"(prompt 1/2, two responses 1/4); {torch.get_num_threads()} threads; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}")
    best = {"dpo": float("inf"), "sft": float("inf")}
    for _ in range(args.rounds):
        for name in best:
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                if name == "dpo":
                    dpo_step(model, batch, reference=reference)
                else:
                    loss, _ = next_token_loss(model, batch)
                    loss.backward()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:>4}: {seconds * 1000:8.1f} ms/step  {tokens / seconds:9.0f} tokens/s")
    print(f"DPO (precomputed reference) / SFT tokens/s: {best['sft'] / best['dpo']:.2f}x (target >= 0.9x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["layout", "memory", "speed"],
                        choices=["layout", "memory", "speed"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt", type=int, default=384, help="mean prompt length in tokens")
    parser.add_argument("--response", type=int, default=48, help="mean response length in tokens")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as trainer.precision=bf16-mixed)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary of the memory and speed parts")
    parser.add_argument("--dim", type=int, default=128, help="backbone width of the memory and speed parts")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="row lengths of the memory part")
    parser.add_argument("--memory-share", type=float, default=0.5,
                        help="share of the available memory the full-logit step may need to run (else it is estimated)")
    parser.add_argument("--speed-length", type=int, default=2048)
    parser.add_argument("--speed-rows", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for part in args.parts:
        {"layout": layout, "memory": memory, "speed": speed}[part](args)


if __name__ == "__main__":
    main()
