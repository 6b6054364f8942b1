"""Shared-prompt rows against separate padded rows, for a DPO training step.

A preference set whose prompts are long relative to the responses (``--prompt`` tokens against
``--response`` tokens, 2 responses per prompt, lengths varying by up to ±25%) is encoded two ways:

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

    python bench/preference.py                      # tiny preset, prompts of 384, responses of 48
    python bench/preference.py --prompt 768 --response 32 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from common import PeakRSS
from herd.model import Transformer
from herd.presets import model_preset
from herd.stages.dpo import dpo_loss
from herd.stages.preference import find_responses, ranked_pairs, response_logps

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt", type=int, default=384, help="mean prompt length in tokens")
    parser.add_argument("--response", type=int, default=48, help="mean response length in tokens")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as trainer.precision=bf16-mixed)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(model_preset(args.preset))
    pairs = make_pairs(args.batch, args.prompt, args.response, model.config.vocab_size, seed=0)
    shared = encode([[group] for group in pairs])
    separate = encode([[(prompt, [response])] for prompt, responses in pairs for response in responses])
    work_tokens = sum(2 * len(p) + sum(len(r) for r in rs) for p, rs in pairs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} preset; {args.batch} prompts "
          f"of ~{args.prompt} tokens, 2 responses of ~{args.response}; shared rows {tuple(shared['tokens'].shape)}, "
          f"separate rows {tuple(separate['tokens'].shape)}; {'bf16 autocast' if args.bf16 else 'fp32'}")

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


if __name__ == "__main__":
    main()
