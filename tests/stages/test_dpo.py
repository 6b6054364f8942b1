"""stage=dpo: dpo_loss against its formula, ln 2 at step 0 (packed and unpacked), masked tokens without
gradient, the NLL term as the chosen tokens' mean NLL, and shared-prompt log-probs against each
response encoded alone."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.training import preference_batch, response_tokens
from herd.interop import hf
from herd.model import Transformer
from herd.stages.dpo import DPOStage, chosen_nll, dpo_loss
from herd.stages.preference import find_responses, response_logps


def test_dpo_loss_matches_the_formula_on_random_inputs():
    pc, pr, rc, rr = (torch.randn(16) * 5 for _ in range(4))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    by_hand = torch.tensor([-math.log(1 / (1 + math.exp(-0.1 * ((a - c) - (b - d)))))
                            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)])
    assert torch.allclose(losses, by_hand.float(), atol=1e-6)
    assert torch.allclose(chosen, 0.1 * (pc - rc)) and torch.allclose(rejected, 0.1 * (pr - rr))


def _ids(generator, n):
    return torch.randint(10, 97, (n,), generator=generator).tolist()


def _groups(seed):
    g = torch.Generator().manual_seed(seed)
    return [(_ids(g, 8), [(*response_tokens(_ids(g, 5)), 0), (*response_tokens(_ids(g, 3)), 1)]),
            (_ids(g, 6), [(*response_tokens(_ids(g, 4)), 2), (*response_tokens(_ids(g, 6)), 0),
                          (*response_tokens(_ids(g, 2)), 1)])]


@pytest.fixture
def start(tmp_path, small_config):
    return str(hf.save(Transformer(small_config), tmp_path / "start"))


def _stage(small_config, start, reference="live"):
    stage = DPOStage(model=small_config, init_from=start, reference=reference)
    stage.configure_model()
    return stage


def test_shared_prompt_logps_equal_each_response_encoded_alone(small_config, start):
    stage = _stage(small_config, start)
    groups = _groups(0)
    batch = preference_batch([groups], seq=64)
    with torch.no_grad():
        logps, responses = stage._logps(stage.model, batch)
        alone = []
        for prompt, group in groups:
            for ids, content, _ in group:
                logits = stage.model(torch.tensor([prompt + ids]))[0].log_softmax(-1)
                positions = [len(prompt) + i for i, trained in enumerate(content) if trained]
                alone.append(sum(logits[p - 1, (prompt + ids)[p]].item() for p in positions))
    assert responses.count == 5
    assert torch.allclose(logps, torch.tensor(alone), atol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_at_step_0_the_dpo_loss_is_exactly_ln_2(small_config, start, packed):
    stage = _stage(small_config, start)
    stage.nll_weight = 0.0
    groups = _groups(1)
    rows = [groups] if packed else [[group] for group in groups]
    _, metrics, pairs = stage.step(preference_batch(rows, seq=64))
    assert pairs == 1 + 3
    assert metrics["loss"].item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margin"].item() == 0.0


def test_masked_tokens_get_no_gradient_and_the_nll_is_the_chosen_tokens_mean_nll(small_config, start):
    stage = _stage(small_config, start)
    batch = preference_batch([_groups(2)], seq=64)
    responses = find_responses(batch)
    hidden = stage.model.hidden_states(batch["tokens"], document_ids=batch["document_ids"],
                                       response_ids=batch["response_ids"]).detach().requires_grad_(True)
    logps, tokens = response_logps(hidden, stage.model.output.weight, batch["targets"], responses.token_response,
                                   responses.count)
    reference = logps.detach() - torch.randn_like(logps)  # policy != reference: a real DPO gradient
    better = torch.tensor([0, 3, 3, 4])
    worse = torch.tensor([1, 2, 4, 2])
    losses, _, _ = dpo_loss(logps[better], logps[worse], reference[better], reference[worse], 0.1)
    nll = chosen_nll(logps, tokens, responses)
    (losses.mean() + 0.2 * nll).backward()
    scored = batch["targets"] != -100  # the position predicting a content token
    assert hidden.grad[~scored].abs().max() == 0  # prompt, headers, eot, padding: no gradient
    assert (hidden.grad[scored].abs().sum(-1) > 0).all()
    # the NLL by hand: rank-0 responses are 0 (first group) and 3 (second group)
    log_probs = stage.model.output(hidden.detach()).log_softmax(-1)[0]
    chosen = [p for p in range(63) if scored[0, p] and responses.token_response[0, p].item() in (0, 3)]
    by_hand = -sum(log_probs[p, batch["targets"][0, p]].item() for p in chosen) / len(chosen)
    assert nll.item() == pytest.approx(by_hand, rel=1e-5)


def test_precomputed_reference_equals_the_live_one(small_config, start):
    live = _stage(small_config, start, "live")
    batch = preference_batch([_groups(3)], seq=64)
    responses = find_responses(batch)
    with torch.no_grad():
        logps, _ = live._logps(live.model, batch)
    pre = _stage(small_config, start, "precompute")
    pre.reference_logps = pre._by_row(batch, responses, logps)
    assert torch.equal(pre._reference_logps(batch, responses), live._reference_logps(batch, responses))
    other = preference_batch([_groups(4)], seq=64)
    with pytest.raises(RuntimeError, match="no precomputed reference"):
        pre._reference_logps(other, find_responses(other))


def test_dpo_refuses_bad_settings(small_config, start):
    with pytest.raises(ValueError, match="init_from"):
        DPOStage(model=small_config)
    with pytest.raises(ValueError, match="stage.reference"):
        DPOStage(model=small_config, init_from=start, reference="cached")
    with pytest.raises(ValueError, match="preference"):
        _stage(small_config, start).step({"tokens": torch.zeros(1, 4, dtype=torch.long)})
