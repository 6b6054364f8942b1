"""Sampling with a KV cache: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.model.transformer import Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each row of ``prompt`` (batch, prompt_len); returns (batch, prompt_len + new).

    ``temperature == 0`` is greedy. Rows that emit a token from ``stop_ids`` keep emitting it, and
    decoding ends early once every row has stopped.
    """
    batch, prompt_len = prompt.shape
    max_len = min(prompt_len + max_new_tokens, model.config.max_seq_len)
    cache = model.new_cache(batch, max_len)
    logits = model(prompt, cache=cache)[:, -1]
    out = [prompt]
    stop = torch.tensor(list(stop_ids), dtype=prompt.dtype, device=prompt.device)
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for _ in range(max_len - prompt_len):
        next_token = sample(logits, temperature=temperature, top_p=top_p, generator=generator)
        if done.any():
            next_token = torch.where(done, out[-1][:, -1], next_token)
        out.append(next_token[:, None])
        done |= torch.isin(next_token, stop)
        if bool(done.all()) or cache.length >= max_len:
            break
        logits = model(next_token[:, None], cache=cache)[:, -1]
    return torch.cat(out, dim=1)


def sample(
    logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row from logits (batch, vocab)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
