"""Batched generation: ragged prompts, K samples from one prefill, stop ids, top-k/top-p, parity with transformers."""

from __future__ import annotations

import importlib

import pytest
import torch

from herd.interop import hf
from herd.model import Transformer, generate, stream
from herd.model.generate import draw, nucleus, sample

generation = importlib.import_module("herd.model.generate")  # the module: herd.model.generate is the function


@pytest.fixture
def model(small_config) -> Transformer:
    return Transformer(small_config).eval()


def prompts_of(model: Transformer, *lengths: int) -> list[torch.Tensor]:
    return [torch.randint(0, model.config.vocab_size, (n,)) for n in lengths]


def greedy_without_cache(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The reference: argmax of a full forward pass over everything so far, one token at a time."""
    tokens = prompt[None]
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt) :].tolist()


class DecodeBatches:
    """Records the batch size of every forward call (prefill: several positions; decode: one)."""

    def __init__(self, model: Transformer) -> None:
        self.prefills: list[tuple[int, int]] = []
        self.decodes: list[int] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        batch, seq = args[0].shape
        (self.prefills.append((batch, seq)) if seq > 1 else self.decodes.append(batch))


# ------------------------------------------------------------------------------------ ragged batch


def test_ragged_batch_greedy_equals_each_prompt_alone_without_cache(model):
    prompts = prompts_of(model, 3, 11, 6, 1, 8)
    out = generate(model, prompts, 12)
    assert out == [greedy_without_cache(model, p, 12) for p in prompts]
    assert all(isinstance(t, int) for row in out for t in row)


def test_left_padding_is_never_attended_and_positions_start_at_each_prompt(model):
    prompt = torch.randint(0, model.config.vocab_size, (5,))
    with torch.no_grad():
        alone = model(prompt[None])[0]
        for pad in (torch.zeros(4, dtype=torch.long), torch.randint(0, model.config.vocab_size, (4,))):
            cache = model.new_cache(1, 16)
            cache.pad_left(torch.tensor([4]))
            padded = model(torch.cat([pad, prompt])[None], cache=cache)[0, 4:]
            assert (padded - alone).abs().max() < 1e-5  # whatever the padding holds
            assert cache.positions(2).tolist() == [[5, 6]]


def test_tensor_prompts_return_prompt_and_new_tokens(model):
    prompt = torch.randint(0, model.config.vocab_size, (3, 5))
    out = generate(model, prompt, 7, num_samples=2)
    assert out.shape == (6, 12) and torch.equal(out[:, :5], prompt.repeat_interleave(2, dim=0))
    assert out[::2, 5:].tolist() == [greedy_without_cache(model, p, 7) for p in prompt]


def test_stream_yields_the_tokens_of_generate(model):
    prompt = torch.randint(0, model.config.vocab_size, (4,)).tolist()
    assert list(stream(model, prompt, 9)) == generate(model, [prompt], 9)[0]


def test_bf16_model_generates(model):
    out = generate(model.to(torch.bfloat16), prompts_of(model, 4, 7), 6, temperature=0.7, seed=1)
    assert [len(row) for row in out] == [6, 6]


def test_generation_stays_inside_the_context(model):
    prompt = torch.randint(0, model.config.vocab_size, (model.config.max_seq_len - 3,))
    assert len(generate(model, [prompt], 10)[0]) == 3
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, [torch.zeros(model.config.max_seq_len, dtype=torch.long)], 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"num_samples": 0}, "num_samples"), ({"seed": 1, "generator": torch.Generator()}, "either"),
])
def test_impossible_options_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompts_of(model, 3), 4, **kwargs)


def test_impossible_prompts_are_refused(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, model.config.vocab_size]], 4)


# -------------------------------------------------------------------------- K samples, one prefill


def test_k_samples_from_one_prefill_equal_k_separate_samplings_with_the_same_random_numbers(model, monkeypatch):
    k, steps = 4, 9
    table = torch.rand(steps, 2 * k)  # the uniform number of row r at step s
    calls = {"step": 0, "rows": slice(None)}

    def uniform(n, generator, device):
        values = table[calls["step"], calls["rows"]]
        calls["step"] += 1
        assert len(values) == n
        return values

    monkeypatch.setattr(generation, "uniform", uniform)
    prompts = prompts_of(model, 5, 2)
    batches = DecodeBatches(model)
    together = generate(model, prompts, steps, temperature=1.3, top_p=0.9, top_k=40, num_samples=k)
    assert batches.prefills == [(2, 5)]  # both prompts, once
    assert set(batches.decodes) == {2 * k}
    for row in range(2 * k):  # row i * k + j is sample j of prompt i
        calls.update(step=0, rows=slice(row, row + 1))
        alone = generate(model, [prompts[row // k]], steps, temperature=1.3, top_p=0.9, top_k=40)
        assert together[row] == alone[0]
    assert len({tuple(row) for row in together}) > 2  # the samples differ


def test_sampling_is_reproducible_with_a_seed(model):
    prompts = prompts_of(model, 3, 6)
    a = generate(model, prompts, 8, temperature=1.0, top_p=0.9, num_samples=3, seed=7)
    b = generate(model, prompts, 8, temperature=1.0, top_p=0.9, num_samples=3, generator=torch.Generator().manual_seed(7))
    assert a == b
    assert a != generate(model, prompts, 8, temperature=1.0, top_p=0.9, num_samples=3, seed=8)


# ------------------------------------------------------------------------------------------ stops


def test_stop_ids_end_rows_independently_and_finished_rows_leave_the_batch(model):
    prompts = prompts_of(model, 4, 9, 6)
    free = generate(model, prompts, 16)
    stop = free[0][2]  # row 0 stops at its third token
    assert stop not in free[1][:8], "pick prompts whose other rows run longer"
    batches = DecodeBatches(model)
    out = generate(model, prompts, 16, stop_ids=[stop])
    for row, full in zip(out, free, strict=True):  # each row is its own output cut after its first stop
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    assert len(out[0]) == 3 and len(out[1]) > 3
    assert batches.decodes[:2] == [3, 3] and batches.decodes[2] == 2  # row 0 costs nothing after its stop
    assert batches.decodes == sorted(batches.decodes, reverse=True)


def test_tensor_rows_that_stopped_repeat_their_stop_token(model):
    prompt = torch.randint(0, model.config.vocab_size, (2, 4))
    free = generate(model, prompt, 10)
    stop = int(free[0, 5])
    out = generate(model, prompt, 10, stop_ids=[stop])
    first = out[0].tolist().index(stop, 4)
    assert (out[0, first:] == stop).all() and torch.equal(out[0, : first + 1], free[0, : first + 1])


def test_decoding_ends_when_every_row_stopped(model):
    prompts = prompts_of(model, 3, 5)
    firsts = [row[0] for row in generate(model, prompts, 1)]
    batches = DecodeBatches(model)
    assert generate(model, prompts, 20, stop_ids=firsts) == [[t] for t in firsts]
    assert batches.decodes == []


# ------------------------------------------------------------------------------------ top-k, top-p


def test_top_k_samples_stay_within_the_k_most_likely_tokens():
    logits = torch.randn(16, 50)
    allowed = logits.topk(5, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        token = sample(logits, temperature=2.0, top_k=5, generator=generator)
        assert (allowed == token[:, None]).any(dim=1).all()
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, generator=generator), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    kept = {p: (nucleus(probs, p) > 0).nonzero().tolist() for p in (0.01, 0.75, 0.79, 0.85)}
    assert kept[0.01] == [[0, 1], *([1, i] for i in range(5))]  # the top token; all tokens tie in row 1
    assert kept[0.75] == kept[0.79] == [[0, 1], [0, 3], *([1, i] for i in range(5))]
    assert kept[0.85] == [[0, 1], [0, 2], [0, 3], *([1, i] for i in range(5))]
    assert torch.equal(nucleus(probs, 0.92), probs)  # the 4th token is needed; the 5th ties with it
    generator = torch.Generator().manual_seed(0)
    tokens = torch.stack([sample(probs[:1].log(), temperature=1.0, top_p=0.75, generator=generator) for _ in range(400)])
    assert set(tokens.flatten().tolist()) == {1, 3}


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([[0.0, 0.6, 0.0, 0.3, 0.1, 0.0]]).expand(20000, 6)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=6) / 20000
    assert counts[[0, 2, 5]].sum() == 0
    assert (counts - probs[0]).abs().max() < 0.015


# -------------------------------------------------------------------------------------- KV cache


def test_kv_cache_select_drops_reorders_and_repeats_rows(model):
    tokens = torch.randint(0, model.config.vocab_size, (3, 6))
    with torch.no_grad():
        cache = model.new_cache(6, 10)
        cache.select(torch.arange(3))  # prefill 3 rows of a cache built for 6
        model(tokens, cache=cache)
        keys = cache.keys[0][:, :, :6].clone()
        cache.select(torch.tensor([2, 0, 0, 1, 1, 2]))
        assert torch.equal(cache.keys[0][:, :, :6], keys[[2, 0, 0, 1, 1, 2]])
        assert cache.keys[0].data_ptr() == cache._key_storage[0].data_ptr()  # the storage is reused
        cache.select(torch.tensor([4]))  # the old row 1
        assert cache.batch == 1
        step = model(tokens[1:2, -1:], cache=cache)
    assert (step[0, -1] - model(torch.cat([tokens[1], tokens[1, -1:]])[None])[0, -1]).abs().max() < 1e-5


# --------------------------------------------------------------------------------------- parity


def test_greedy_equals_transformers_generate_on_an_exported_model(tmp_path, small_config):
    from transformers import AutoModelForCausalLM

    hf.save(Transformer(small_config), tmp_path)  # no tokenizer: no eos, nothing stops early
    herd_model = hf.load(tmp_path).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = prompts_of(herd_model, 7, 3, 12)
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                                      do_sample=False, pad_token_id=0)
    assert generate(herd_model, prompts, 64) == expected[:, width:].tolist()


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(model):
    prompts = prompts_of(model, 3, 7)
    assert generate(model, prompts, 8, compile=True) == generate(model, prompts, 8)
