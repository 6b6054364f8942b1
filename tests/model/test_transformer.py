"""Backbone behaviour: packed documents, KV-cache decoding, FlexAttention, generation."""

from __future__ import annotations

import pytest
import torch

from herd.model import Transformer, default_position_ids, generate
from herd.model.attention import attend, build_attention_mask, document_block_mask, flex_attention


@pytest.fixture
def model(small_config) -> Transformer:
    return Transformer(small_config).eval()


def test_document_in_a_packed_row_matches_the_document_alone(model):
    lengths = [5, 11, 7]
    docs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed_logits = model(packed, document_ids=document_ids)
        start = 0
        for doc in docs:
            alone = model(doc[None])
            assert (packed_logits[:, start : start + len(doc)] - alone).abs().max() < 1e-5
            start += len(doc)
        # Without document ids the later documents see earlier ones and differ.
        unmasked = model(packed)
    assert (unmasked[:, lengths[0] :] - packed_logits[:, lengths[0] :]).abs().max() > 1e-3


def test_positions_restart_per_document():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    positions = default_position_ids(document_ids, document_ids)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_kv_cache_decoding_matches_full_forward(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch=2, max_len=20)
        pieces = [model(tokens[:, :8], cache=cache)]  # prompt in one go
        pieces += [model(tokens[:, i : i + 1], cache=cache) for i in range(8, 14)]  # one token at a time
        pieces.append(model(tokens[:, 14:], cache=cache))  # a chunk after single steps
    assert cache.length == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def test_kv_cache_refuses_overflow_and_document_ids(model):
    cache = model.new_cache(batch=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="document_ids cannot be combined"):
        model(torch.zeros(1, 2, dtype=torch.long), document_ids=torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_greedy_generation_with_cache_matches_argmax_without_cache(model):
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    out = generate(model, prompt, max_new_tokens=10)
    assert out.shape == (2, 16) and torch.equal(out[:, :6], prompt)
    expected = prompt
    with torch.no_grad():
        for _ in range(10):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_generation_stops_when_every_row_emitted_a_stop_token(model):
    prompt = torch.randint(0, model.config.vocab_size, (1, 4))
    first = generate(model, prompt, max_new_tokens=1)[0, -1].item()
    out = generate(model, prompt, max_new_tokens=10, stop_ids=[first])
    assert out.shape == (1, 5)


def test_sampling_is_reproducible_with_a_generator(model):
    prompt = torch.randint(0, model.config.vocab_size, (3, 4))
    a = generate(model, prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.skipif(flex_attention is None, reason="FlexAttention needs torch >= 2.5")
def test_flex_attention_block_mask_matches_sdpa_boolean_mask(small_config):
    # FlexAttention has no CPU backward, but its forward runs eagerly here and must agree with SDPA.
    batch, heads, kv_heads, seq, d = 2, 4, 2, 40, 16
    q = torch.randn(batch, heads, seq, d)
    k, v = torch.randn(batch, kv_heads, seq, d), torch.randn(batch, kv_heads, seq, d)
    document_ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [4] * 40])
    bool_mask = build_attention_mask(small_config, batch, seq, q.device, document_ids=document_ids)
    with torch.no_grad():
        expected = attend(q, k, v, bool_mask)
        got = attend(q, k, v, document_block_mask(document_ids))
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.skipif(flex_attention is None, reason="FlexAttention needs torch >= 2.5")
def test_shared_prompt_block_mask_matches_the_sdpa_boolean_mask(small_config):
    batch, heads, kv_heads, seq, d = 2, 4, 2, 40, 16
    q = torch.randn(batch, heads, seq, d)
    k, v = torch.randn(batch, kv_heads, seq, d), torch.randn(batch, kv_heads, seq, d)
    document_ids = torch.tensor([[0] * 20 + [1] * 15 + [2] * 5, [0] * 40])
    response_ids = torch.tensor([[0] * 6 + [1] * 8 + [2] * 6 + [0] * 4 + [1] * 5 + [2] * 3 + [3] * 3 + [0] * 5,
                                 [0] * 10 + [1] * 30])
    bool_mask = build_attention_mask(small_config, batch, seq, q.device, document_ids=document_ids,
                                     response_ids=response_ids)
    with torch.no_grad():
        expected = attend(q, k, v, bool_mask)
        got = attend(q, k, v, document_block_mask(document_ids, response_ids))
    assert (got - expected).abs().max() < 1e-5
    # a response never sees a sibling response: token 15 (response 2) sees the prompt and itself only
    assert bool_mask[0, 0, 15].nonzero().flatten().tolist() == [*range(6), 14, 15]


def test_shared_prompt_positions_continue_each_response_from_its_prompt():
    document_ids = torch.tensor([[0] * 9 + [1] * 6 + [2] * 2])
    response_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 1, 1, 2, 2, 0, 0]])
    positions = default_position_ids(document_ids, document_ids, response_ids=response_ids)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 5, 0, 1, 2, 3, 2, 3, 0, 1]]


def test_shared_prompt_rows_compute_each_response_as_if_it_followed_the_prompt_alone(model):
    prompt, first, second, other = (torch.randint(0, model.config.vocab_size, (n,)) for n in (7, 5, 4, 6))
    row = torch.cat([prompt, first, second, other])[None]
    document_ids = torch.tensor([[0] * 16 + [1] * 6])
    response_ids = torch.tensor([[0] * 7 + [1] * 5 + [2] * 4 + [0] * 6])
    with torch.no_grad():
        shared = model(row, document_ids=document_ids, response_ids=response_ids)[0]
        alone_first = model(torch.cat([prompt, first])[None])[0]
        alone_second = model(torch.cat([prompt, second])[None])[0]
        alone_other = model(other[None])[0]
    assert (shared[:12] - alone_first).abs().max() < 1e-5
    assert (shared[12:16] - alone_second[7:]).abs().max() < 1e-5
    assert (shared[16:] - alone_other).abs().max() < 1e-5


def test_bf16_autocast_forward_and_backward_are_finite(model):
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens, document_ids=torch.zeros_like(tokens))
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
