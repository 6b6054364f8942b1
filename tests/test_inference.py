"""Using a model directory with its own tokenizer and chat template, against ``transformers``.

For three tokenizer styles (ChatML without bos, Llama 2's ``[INST]``, Llama 3), a tiny random
``LlamaForCausalLM`` saved with the tokenizer's files is loaded by herd, and herd's greedy chat
answers and reward scores are compared with what ``transformers`` computes for the same ids.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from helpers.tokenizers import DIALOGS, STYLES, style_folder
from herd.inference import Loaded, chat_messages, decode_answers, load, score_dialogs
from herd.interop import hf
from herd.model import RewardModel


def _llama_config(vocab_size: int, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, tie_word_embeddings=False, **extra)


@pytest.fixture(scope="module", params=STYLES)
def model_dir(request, tmp_path_factory):
    """(style, folder): a tiny random LlamaForCausalLM with the tokenizer of ``style`` beside it."""
    folder = tmp_path_factory.mktemp(request.param)
    tokenizer_folder = style_folder(request.param, folder / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(len(tokenizer))).eval()
    model.save_pretrained(folder / "model")
    for file in tokenizer_folder.iterdir():
        shutil.copy(file, folder / "model" / file.name)
    return request.param, folder / "model"


def test_greedy_chat_answers_are_transformers_generate_token_for_token(model_dir):
    style, folder = model_dir
    loaded: Loaded = load(str(folder))
    reference = LlamaForCausalLM.from_pretrained(folder).eval()
    prompts = [chat_messages("What is the capital of France?"),
               chat_messages("And print(add(2, 3))?", system="You are a helpful assistant.")]
    ids = [loaded.chat.prompt_ids(p) for p in prompts]
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for prompt, row in zip(prompts, ids, strict=True):
        assert row == hf_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    answers = decode_answers(loaded.model, loaded.tokenizer, ids, 12, stop_ids=loaded.chat.stop_ids,
                             temperature=0.0)
    for row, (answer,) in zip(ids, answers, strict=True):
        out = reference.generate(torch.tensor([row]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=list(loaded.chat.stop_ids), pad_token_id=loaded.tokenizer.pad_id)
        new = out[0, len(row):].tolist()
        if new and new[-1] in loaded.chat.stop_ids:
            new = new[:-1]
        assert answer.text == loaded.tokenizer.decode(new)
        assert answer.tokens == len(out[0]) - len(row)


def test_rewards_are_read_where_llama_for_sequence_classification_reads_them(model_dir, tmp_path):
    style, folder = model_dir
    loaded = load(str(folder))
    torch.manual_seed(1)
    config = _llama_config(loaded.model.config.vocab_size, num_labels=1, pad_token_id=loaded.tokenizer.pad_id)
    reference = LlamaForSequenceClassification(config).eval()
    reference.save_pretrained(tmp_path / "reward")
    reward = hf.load_reward_model(tmp_path / "reward")
    assert isinstance(reward, RewardModel)
    dialogs = [d for d in DIALOGS]
    scores = score_dialogs(reward.eval(), loaded.chat, dialogs, batch_size=2)
    for dialog, score in zip(dialogs, scores, strict=True):
        ids = loaded.chat.response_ids(dialog)
        end_of_turn = loaded.chat.response_end_id
        # the reward is read at the answer's end-of-turn, or at its last token where that is the pad token
        assert ids[-1] == end_of_turn if end_of_turn != loaded.tokenizer.pad_id else ids[-1] != end_of_turn
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
