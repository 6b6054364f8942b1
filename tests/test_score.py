"""python -m herd.score: rewards of a reward-model directory, in batches, against transformers' reward."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from herd.data.chat import encode_dialog
from herd.data.tokenizer import Tokenizer, train_tokenizer
from herd.interop import hf
from herd.model import ModelConfig, RewardModel, Transformer
from herd.presets import config_dir
from herd.score import score_file


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    """A random 2-layer reward model with a 512-id herd tokenizer."""
    root = tmp_path_factory.mktemp("score")
    train_tokenizer([inspect.getsource(textwrap)], vocab_size=512).save(root / "tokenizer")
    torch.manual_seed(0)
    model = RewardModel(Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                                max_seq_len=256)))
    return hf.save_reward_model(model.backbone, model.head.weight, root / "rm", tokenizer=root / "tokenizer")


DIALOGS = [
    [{"role": "user", "content": "What does textwrap.dedent do?"},
     {"role": "assistant", "content": "Remove any common leading whitespace from every line in text."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Wrap it."},
     {"role": "assistant", "content": "Done."}],
    [{"role": "user", "content": "Fill a paragraph?"}, {"role": "assistant", "content": "Use textwrap.fill " * 5}],
]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("score", overrides=list(overrides))


def test_scores_equal_transformers_rewards_and_bad_lines_are_counted(reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    source = tmp_path / "dialogs.jsonl"
    lines = [json.dumps({"messages": d}) for d in DIALOGS]
    lines.insert(1, "{not json")
    lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer yet"}]}))
    source.write_text("\n".join(lines) + "\n")
    out, count, skipped = score_file(_compose(f"model_dir={reward_dir}", f"input={source}", "batch_size=2"))
    assert count == 3 and skipped == {"malformed_json": 1, "no_assistant_turn": 1}
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == ["dialogs.jsonl:1", "dialogs.jsonl:3", "dialogs.jsonl:4"]
    tokenizer = Tokenizer.load(reward_dir)
    reference = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    with torch.no_grad():
        for dialog, line in zip(DIALOGS, scored, strict=True):
            ids = torch.tensor([encode_dialog(tokenizer, dialog).ids])
            assert line["reward"] == pytest.approx(reference(input_ids=ids).logits[0, 0].item(), abs=1e-4)
            assert line["messages"] == dialog


def test_bad_options_exit_with_status_2_and_a_message(reward_dir, tmp_path):
    missing = subprocess.run([sys.executable, "-m", "herd.score", f"model_dir={reward_dir}",
                              f"input={tmp_path / 'nope.jsonl'}"], capture_output=True, text=True)
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    policy = hf.save(Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=512)), tmp_path / "policy")
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": DIALOGS[0]}) + "\n")
    wrong = subprocess.run([sys.executable, "-m", "herd.score", f"model_dir={policy}", f"input={tmp_path / 'd.jsonl'}"],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "does not describe a reward model" in wrong.stderr
