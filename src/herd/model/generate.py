"""Batched sampling with one KV cache: ragged prompts, K samples of each prompt from one prefill.

- Prompts of different lengths share one batch by left padding: padding slots are never
  attended and RoPE positions start at 0 at each prompt's first real token (see
  :meth:`KVCache.pad_left`), so every row decodes as it would alone.
- One KV cache is allocated up front for every row that will be decoded. With
  ``num_samples=K`` each prompt is run once; its cache rows and last logits are then repeated
  K times (in place, in the same cache).
- Greedy (``temperature=0``), or sampling with temperature, top-k and top-p (nucleus).
- A row ends when it emits one of ``stop_ids``; finished rows are dropped from the batch (the
  cache is compacted), so they cost nothing afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from herd.model.attention import KVCache
from herd.model.transformer import Transformer

Prompts = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]
DecodeStep = Callable[[Transformer, torch.Tensor, KVCache], torch.Tensor]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    compile: bool = False,
    prompt_embeddings: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[list[int]] | torch.Tensor:
    """Continue every prompt by up to ``max_new_tokens`` tokens, all rows in one batch.

    ``prompts`` is a list of 1-D token sequences of any lengths (lists of ints or tensors), or a
    (batch, len) tensor. With ``num_samples=K`` each prompt is continued K times from one
    prefill; output row ``i * K + j`` is sample j of prompt i.

    Returns, for a list of prompts, a list of the new tokens of each output row, up to and
    including the stop token (one of ``stop_ids``) where the row stopped. For a tensor, a
    (batch * K, len + n) tensor: each prompt followed by its new tokens, where n is the most new
    tokens of any row and a row that stopped earlier repeats its stop token.

    ``temperature == 0`` is greedy; otherwise logits are divided by the temperature, cut to the
    ``top_k`` most likely tokens (0: all) and to the smallest set whose probability reaches
    ``top_p``, then sampled with ``generator`` (or a new one seeded with ``seed``). Generation
    never runs past ``model.config.max_seq_len``. ``compile=True`` runs the decode step under
    ``torch.compile``. ``prompt_embeddings`` gives, per prompt, ``(input_embeddings (len, dim),
    embedding_mask (len,))`` for the prefill (see ``Transformer.forward``): an adapter's outputs
    read in place of some prompt tokens.
    """
    rows, as_tensor = _prompt_rows(prompts)
    new_tokens, lengths = _collect(
        decode(model, rows, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
               stop_ids=stop_ids, num_samples=num_samples, generator=_generator(model, generator, seed),
               step=compiled_step() if compile else decode_step, prompt_embeddings=prompt_embeddings),
        len(rows) * num_samples,
        max_new_tokens,
        model,
    )
    if not as_tensor:
        return [row[:n] for row, n in zip(new_tokens.tolist(), lengths.tolist(), strict=True)]
    # Rows that stopped early repeat their last (stop) token up to the longest row.
    steps = int(lengths.max()) if lengths.numel() else 0
    index = torch.arange(steps, device=lengths.device).expand(len(lengths), steps)
    padded = new_tokens.gather(1, torch.minimum(index, (lengths - 1).clamp(min=0)[:, None]))
    prompt = prompts.to(padded.device).repeat_interleave(num_samples, dim=0)
    return torch.cat([prompt, padded.to(prompt.dtype)], dim=1)


@torch.no_grad()
def stream(
    model: Transformer,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """The new tokens of one prompt, one at a time as they are decoded (the stop token included).

    Same sampling as :func:`generate`; for interactive use, where text is shown as it comes.
    """
    rows, _ = _prompt_rows([prompt])
    for _, tokens in decode(model, rows, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_ids=stop_ids, generator=_generator(model, generator, seed)):
        yield int(tokens[0])


@torch.no_grad()
def decode(
    model: Transformer,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    step: DecodeStep | None = None,
    prompt_embeddings: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The decoding loop: yields ``(rows, tokens)`` once per step, both (active,).

    ``rows`` are the output rows still decoding (prompt i, sample j is row ``i * num_samples +
    j``) and ``tokens`` the token each of them emitted at this step. A row that emits a stop
    token is yielded with it, then dropped from the batch and from the cache.
    ``prompts`` are 1-D long tensors; ``step(model, tokens (active, 1), cache)`` returns the
    next logits (active, vocab) (default :func:`decode_step`). ``prompt_embeddings`` are as in
    :func:`generate`.
    """
    check_sampling(max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples)
    _check_prompts(model, prompts)
    step = step or decode_step
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    new_tokens = min(max_new_tokens, model.config.max_seq_len - width)
    if new_tokens <= 0:
        return
    batch = len(prompts)
    tokens = pad_sequence([p.to(device) for p in prompts], batch_first=True, padding_side="left")  # (batch, width)

    cache = model.new_cache(batch * num_samples, width + new_tokens)  # every decoded row, allocated once
    if num_samples > 1:
        cache.select(torch.arange(batch, device=device))  # the prefill fills the first `batch` rows
    if bool((lengths < width).any()):
        cache.pad_left(width - lengths)
    embedded = {}
    if prompt_embeddings is not None:
        if len(prompt_embeddings) != batch:
            raise ValueError(f"prompt_embeddings has {len(prompt_embeddings)} entries for {batch} prompts")
        embedded = {
            "input_embeddings": pad_sequence([e.to(device) for e, _ in prompt_embeddings], batch_first=True,
                                             padding_side="left"),
            "embedding_mask": pad_sequence([m.to(device) for _, m in prompt_embeddings], batch_first=True,
                                           padding_side="left"),
        }
    hidden = model(tokens, cache=cache, output_hidden=True, **embedded)[:, -1]  # (batch, dim)
    logits = model.output(hidden)  # (batch, vocab): the head only where it is needed
    if num_samples > 1:
        expand = torch.arange(batch, device=device).repeat_interleave(num_samples)
        cache.select(expand)
        logits = logits.index_select(0, expand)

    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    rows = torch.arange(batch * num_samples, device=device)
    for index in range(new_tokens):
        next_token = sample(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        yield rows, next_token
        if index == new_tokens - 1:
            return
        if stop.numel():
            running = ~torch.isin(next_token, stop)
            if not bool(running.all()):
                keep = running.nonzero().squeeze(1)
                if keep.numel() == 0:
                    return
                rows, next_token = rows[keep], next_token[keep]
                cache.select(keep)
        logits = step(model, next_token[:, None], cache)


def decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decoding step: tokens (batch, 1) -> next logits (batch, vocab); the cache advances."""
    return model(tokens, cache=cache)[:, -1]


_compiled_step: DecodeStep | None = None


def compiled_step() -> DecodeStep:
    """:func:`decode_step` under ``torch.compile`` (dynamic shapes: the batch shrinks, the cache grows)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_step, dynamic=True)
    return _compiled_step


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits (batch, vocab): greedy, or sampled after top-k and top-p cuts.

    top-p keeps the most likely tokens until their probability reaches ``top_p`` (at least one
    token; tokens as likely as the last one kept are kept too). A sample takes one uniform
    random number per row (see :func:`draw`).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    order = None
    if 0 < top_k < logits.shape[-1]:
        logits, order = logits.topk(top_k, dim=-1)  # (batch, top_k), most likely first
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p, descending=order is not None)
    choice = draw(probs, generator)
    return choice if order is None else order.gather(-1, choice[:, None]).squeeze(-1)


def nucleus(probs: torch.Tensor, top_p: float, descending: bool = False) -> torch.Tensor:
    """``probs`` (batch, n) with every token outside the top-p nucleus set to 0.

    ``descending=True`` says each row is already sorted, most likely first.
    """
    values = probs if descending else _sorted_descending(probs)
    before = values.cumsum(dim=-1) - values  # probability of the more likely tokens
    size = (before < top_p).sum(dim=-1, keepdim=True)  # >= 1: the most likely token is always kept
    threshold = values.gather(-1, size - 1)  # the least likely probability kept, per row
    return probs.masked_fill(probs < threshold, 0.0)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (batch, n), proportional to the (unnormalised) probabilities.

    Inverse transform sampling: one uniform number per row, located in the row's cumulative
    sum. Cheaper than ``torch.multinomial``, which draws a random number per vocabulary entry.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = uniform(probs.shape[0], generator, probs.device)[:, None] * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total despite rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first index whose cdf exceeds u


def uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n uniform numbers in [0, 1): the only randomness sampling uses (one per row and step)."""
    return torch.rand(n, generator=generator, device=device)


def _sorted_descending(probs: torch.Tensor) -> torch.Tensor:
    """Each row's values sorted, largest first (indices are not needed)."""
    if probs.device.type == "cpu":  # torch's CPU sort also orders indices: ~10x slower than numpy's here
        return torch.from_numpy(np.ascontiguousarray(np.sort(probs.detach().numpy(), axis=-1)[:, ::-1]))
    return probs.sort(dim=-1, descending=True).values


def _prompt_rows(prompts: Prompts) -> tuple[list[torch.Tensor], bool]:
    """The prompts as 1-D long tensors, and whether they came as one (batch, len) tensor."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must be (batch, len), got shape {tuple(prompts.shape)}")
        return list(prompts.long()), True
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token sequences or a (batch, len) tensor, not {type(prompts).__name__}")
    rows = []
    for i, prompt in enumerate(prompts):
        row = torch.as_tensor(prompt).long()
        if row.dim() != 1:
            raise ValueError(f"prompt {i} must be a 1-D token sequence, got shape {tuple(row.shape)}")
        rows.append(row)
    return rows, False


def check_sampling(
    max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, num_samples: int = 1
) -> None:
    """Refuse impossible decoding options with a ValueError that says what to change."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def _check_prompts(model: Transformer, prompts: Sequence[torch.Tensor]) -> None:
    """Refuse prompts the model cannot continue, naming the prompt."""
    if not prompts:
        raise ValueError("no prompts to continue")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: start it with at least one token (e.g. the bos token)")
        low, high = int(prompt.min()), int(prompt.max())
        if low < 0 or high >= model.config.vocab_size:
            raise ValueError(f"prompt {i} has token id {low if low < 0 else high}, outside the model's "
                             f"vocabulary of {model.config.vocab_size}")
        if len(prompt) >= model.config.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: it leaves no room in the model's context "
                             f"of {model.config.max_seq_len}; shorten it")


def _generator(model: Transformer, generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("pass either a generator or a seed, not both")
    return torch.Generator(model.tok_embeddings.weight.device).manual_seed(int(seed))


def _collect(
    steps: Iterator[tuple[torch.Tensor, torch.Tensor]], n_rows: int, max_new_tokens: int, model: Transformer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the yielded steps into new tokens (rows, max_new_tokens), zero-padded, and their counts (rows,).

    Steps that decode the same rows are stacked and written at once (the rows change only
    when one finishes), so collecting costs next to nothing per step.
    """
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(n_rows, max(max_new_tokens, 0), dtype=torch.long, device=device)
    counts = torch.zeros(n_rows, dtype=torch.long, device=device)
    segment: list[torch.Tensor] = []
    segment_rows, start = None, 0

    def flush() -> None:
        if segment:
            tokens[segment_rows, start : start + len(segment)] = torch.stack(segment, dim=1)
            counts[segment_rows] = start + len(segment)

    for index, (rows, next_token) in enumerate(steps):
        if rows is not segment_rows:
            flush()
            segment, segment_rows, start = [], rows, index
        segment.append(next_token)
    flush()
    return tokens, counts
