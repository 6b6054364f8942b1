"""stage=reward: the ranking loss against its formula, shared-prompt rewards against each response
encoded alone, the Hugging Face reward-model round trip, and a short run that learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.training import preference_batch, response_tokens
from herd.interop import hf
from herd.model import Transformer
from herd.stages.base import parameter_groups
from herd.stages.reward import RewardStage, grouped_ranking_loss, ranking_loss


def test_ranking_loss_of_three_responses_is_the_mean_of_its_three_pairwise_losses():
    rewards = torch.tensor([0.3, -1.2, 2.0])
    ranks = torch.tensor([1, 2, 0])  # response 2 best, then 0, then 1
    by_hand = [-math.log(1 / (1 + math.exp(-(rewards[b] - rewards[w]).item())))
               for b, w in ((2, 0), (2, 1), (0, 1))]
    assert ranking_loss(rewards, ranks).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)


def test_tied_ranks_form_no_pair_and_an_all_tied_ranking_is_refused():
    rewards = torch.tensor([0.5, 0.1, -0.4])
    ranks = torch.tensor([0, 1, 1])  # 1 and 2 tie: pairs (0,1) and (0,2) only
    expected = (-F.logsigmoid(rewards[0] - rewards[1]) - F.logsigmoid(rewards[0] - rewards[2])) / 2
    assert ranking_loss(rewards, ranks).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="no pair"):
        ranking_loss(rewards, torch.tensor([1, 1, 1]))


def test_a_batch_loss_is_the_mean_over_prompts_of_their_ranking_losses():
    rewards, ranks = torch.randn(5), torch.tensor([0, 1, 2, 1, 0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    expected = (ranking_loss(rewards[:3], ranks[:3]) + ranking_loss(rewards[3:], ranks[3:])) / 2
    assert grouped_ranking_loss(rewards, ranks, groups).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.fixture
def reward_stage(tmp_path, small_config):
    start = hf.save(Transformer(small_config), tmp_path / "start")
    stage = RewardStage(model=small_config, init_from=str(start))
    stage.configure_model()
    return stage


def _groups(generator):
    def ids(n):
        return torch.randint(10, 97, (n,), generator=generator).tolist()
    return [(ids(9), [(*response_tokens(ids(4)), 0), (*response_tokens(ids(6)), 2), (*response_tokens(ids(3)), 1)]),
            (ids(5), [(*response_tokens(ids(5)), 1), (*response_tokens(ids(2)), 0)])]


def test_shared_prompt_rewards_equal_each_response_encoded_alone_after_its_prompt(reward_stage):
    groups = _groups(torch.Generator().manual_seed(1))
    batch = preference_batch([groups], seq=64)
    rewards, responses = reward_stage.rewards(batch)
    alone = []
    with torch.no_grad():
        for prompt, group in groups:
            for ids, _, _ in group:
                hidden = reward_stage.model.hidden_states(torch.tensor([prompt + ids]))
                alone.append(reward_stage.value_head(hidden[0, -1]).item())
    assert responses.count == 5
    assert responses.ranks.tolist() == [0, 2, 1, 1, 0]
    assert torch.allclose(rewards.detach(), torch.tensor(alone), atol=1e-5)


def test_the_reward_model_directory_loads_in_transformers_with_the_same_rewards(reward_stage, tmp_path):
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        reward_stage.value_head.weight.normal_()
    state = reward_stage.export_state()
    out = reward_stage.save_export(tmp_path / "rm", state)
    hf_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "LlamaForSequenceClassification" and hf_model.config.num_labels == 1
    reloaded = hf.load_reward_model(out)
    groups = _groups(torch.Generator().manual_seed(2))
    rewards, _ = reward_stage.rewards(preference_batch([groups], seq=64))
    expected = []
    with torch.no_grad():
        for prompt, group in groups:
            for ids, _, _ in group:
                dialog = torch.tensor([prompt + ids])
                expected.append(hf_model(input_ids=dialog).logits[0, 0].item())
                assert reloaded.score(dialog, torch.tensor([dialog.shape[1]])).item() == pytest.approx(
                    expected[-1], abs=1e-4)
    assert torch.allclose(rewards.detach(), torch.tensor(expected), atol=1e-4)
    assert torch.equal(reloaded.head.weight, reward_stage.value_head.weight.detach())


def test_a_reward_directory_continues_with_its_head_and_policy_stages_refuse_it(reward_stage, tmp_path, small_config):
    from herd.stages.sft import SFTStage

    with torch.no_grad():
        reward_stage.value_head.weight.fill_(0.25)
    out = reward_stage.save_export(tmp_path / "rm", reward_stage.export_state())
    again = RewardStage(model=small_config, init_from=str(out))
    again.configure_model()
    assert torch.equal(again.value_head.weight, torch.full((1, 64), 0.25))
    with pytest.raises(ValueError, match="is a reward model"):
        SFTStage(model=small_config, init_from=str(out))


def test_the_optimizer_trains_head_and_backbone_but_not_the_unused_lm_head(reward_stage):
    groups = parameter_groups(reward_stage.trained_modules(), 0.0)
    ids = {id(p) for group in groups for p in group["params"]}
    assert id(reward_stage.value_head.weight) in ids
    assert id(reward_stage.model.layers[0].attention.wq.weight) in ids
    assert id(reward_stage.model.output.weight) not in ids
