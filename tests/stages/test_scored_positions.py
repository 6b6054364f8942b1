"""The output layer runs where a token is scored, and nowhere else.

- SFT, DPO (policy, live and precomputed reference) and MCQ log-probs from the scored positions'
  hidden states equal the log-probs read from whole logits (1e-6);
- the reward stage and ``herd.score`` never run the language-model head (a hook and a check on
  every torch call fail if its weight is used).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers.invariance import collate, rows
from helpers.training import preference_batch, response_tokens
from herd.constants import IGNORE_INDEX
from herd.data.chat import chat_format
from herd.data.tokenizer import train_tokenizer
from herd.evaluation.mcq import continuation_logprobs
from herd.inference import score_dialogs
from herd.interop import hf
from herd.model import RewardModel, Transformer
from herd.model.loss import next_token_loss
from herd.stages.dpo import DPOStage
from herd.stages.reward import RewardStage


def full_logps(model, batch, **kwargs):
    """log p(target) at every position from whole (batch, seq, vocab) logits; 0 where nothing is scored."""
    with torch.no_grad():
        logits = model(batch["tokens"], **kwargs).float()
    targets = batch["targets"]
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked, torch.zeros_like(picked))


@pytest.fixture
def start(tmp_path, small_config):
    return str(hf.save(Transformer(small_config), tmp_path / "start"))


def test_sft_rows_scored_positions_equal_whole_logits(small_config):
    model = Transformer(small_config)
    batch = collate(rows("sft"))  # prompts masked, answers of 1 to 22 tokens, padding
    expected = full_logps(model, batch, document_ids=batch["document_ids"])
    n = (batch["targets"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        loss, n_tokens = next_token_loss(model, batch, chunk_size=5)
    assert n_tokens == n
    assert loss.item() == pytest.approx(-(expected.sum() / n).item(), rel=1e-6)


@pytest.mark.parametrize("reference", ["live", "precompute"])
def test_dpo_rows_scored_positions_equal_whole_logits(small_config, start, reference):
    stage = DPOStage(model=small_config, init_from=start, reference=reference)
    stage.configure_model()
    batch = collate(rows("dpo"))
    kwargs = {"document_ids": batch["document_ids"], "response_ids": batch["response_ids"]}
    with torch.no_grad():
        logps, responses = stage._logps(stage.model, batch)  # the policy, the precompute pass, the live reference
    per_token = full_logps(stage.model, batch, **kwargs)
    scored = batch["targets"] != IGNORE_INDEX
    expected = torch.zeros(responses.count).index_add(0, responses.token_response[scored], per_token[scored])
    assert torch.allclose(logps, expected, rtol=1e-6, atol=1e-6)
    if reference == "live":
        assert torch.allclose(stage._reference_logps(batch, responses), expected, rtol=1e-6, atol=1e-6)
    else:
        stage.reference_logps = stage._by_row(batch, responses, logps)
        assert torch.equal(stage._reference_logps(batch, responses), logps)


def test_mcq_rows_scored_positions_equal_whole_logits(small_config):
    model = Transformer(small_config).eval()
    generator = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(1, 97, (n,), generator=generator).tolist()

    requests = [(context, ids(n)) for context in (ids(9), ids(4), ids(13)) for n in (1, 3, 6)]
    expected = []
    with torch.no_grad():
        for context, continuation in requests:
            row = torch.tensor([context + continuation])
            logprobs = model(row[:, :-1])[0].float().log_softmax(-1)
            expected.append(sum(float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(continuation)))
    shared = continuation_logprobs(model, requests, batch_size=3)  # one context per batch: its KV cache, no padding
    assert shared == pytest.approx(expected, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------- no LM head


class WeightNeverUsed(TorchFunctionMode):
    """Fails on any torch call that takes ``weight`` (the LM head's) as an argument."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(a is self.weight for a in (*args, *kwargs.values())):
            raise AssertionError(f"the language-model head's weight was used ({func})")
        return func(*args, **kwargs)


def never_runs(output):
    """A forward hook that fails if the LM head (``output``) runs."""
    def hook(module, inputs, out):
        raise AssertionError("the language-model head ran")
    return output.register_forward_hook(hook)


def _groups(generator):
    def ids(n):
        return torch.randint(10, 97, (n,), generator=generator).tolist()
    return [(ids(6), [(*response_tokens(ids(4)), 0), (*response_tokens(ids(2)), 1)])]


def test_the_reward_stage_never_runs_the_lm_head(small_config, start):
    stage = RewardStage(model=small_config, init_from=start)  # untied: the head is a weight of its own
    stage.configure_model()
    batch = preference_batch([_groups(torch.Generator().manual_seed(0))] * 2, seq=32)
    handle = never_runs(stage.model.output)
    try:
        with WeightNeverUsed(stage.model.output.weight):
            rewards, responses = stage.rewards(batch)
            rewards.sum().backward()
            stage.loss_counts(batch)
    finally:
        handle.remove()
    assert responses.count == 4 and stage.value_head.weight.grad is not None


def test_herd_score_never_runs_the_lm_head(small_config):
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=512)
    config = small_config.__class__(**{**small_config.to_dict(), "vocab_size": tokenizer.vocab_size})
    model = RewardModel(Transformer(config)).eval()
    dialogs = [[{"role": "user", "content": "the fox?"}, {"role": "assistant", "content": "jumps" * k}]
               for k in (1, 3, 2)]
    handle = never_runs(model.backbone.output)
    try:
        with WeightNeverUsed(model.backbone.output.weight):
            scores = score_dialogs(model, chat_format(tokenizer), dialogs, batch_size=2)
    finally:
        handle.remove()
    with torch.no_grad():  # and the scores are the head on each dialog's last hidden state
        for dialog, score in zip(dialogs, scores, strict=True):
            ids = torch.tensor([chat_format(tokenizer).response_ids(dialog)])
            assert score == pytest.approx(float(model(ids)[0, -1]), abs=1e-5)
