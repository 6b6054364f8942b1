"""Score dialogs with a reward model (a ``LlamaForSequenceClassification`` directory) from the command line.

    python -m herd.score model_dir=logs/tiny_reward/runs/<run>/export input=dialogs.jsonl
    python -m herd.score model_dir=... input=dialogs.jsonl output=scored.jsonl batch_size=32 dtype=bf16

Each input line is a dialog in the format ``herd.prepare`` reads (``{"messages": [...]}``, or
``{"prompt": ..., "completion": ...}``) that ends with an assistant message. It is encoded in the
Llama 3 chat format, so it ends with that message's ``<|eot_id|>``, where the reward is read.
Dialogs are scored in batches of similar length; each output line is ``{"id": "<file>:<line>",
"reward": r, "messages": [...]}``, in input order. Lines that are not usable dialogs, or longer
than the model's context, are skipped and counted, each named by file and line in the log.
Mistakes in the options, the model directory or the input are reported as
``herd.score: <message>`` with exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from herd.data.chat import encode_dialog
from herd.data.inputs import BadInputError
from herd.data.kinds.dialog import jsonl_dialogs
from herd.data.tokenizer import Tokenizer
from herd.interop import gguf, hf
from herd.model import RewardModel
from herd.paths import resolve
from herd.presets import config_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
logger = logging.getLogger(__name__)


@torch.no_grad()
def score_dialogs(
    model: RewardModel, tokenizer: Tokenizer, dialogs: Sequence[Sequence[dict[str, Any]]], batch_size: int = 16
) -> list[float]:
    """The reward of each dialog (lists of messages ending with the assistant's), in order.

    Dialogs are sorted by length and scored ``batch_size`` at a time, right-padded; the reward is
    read at each dialog's last token. A dialog longer than the model's context raises ValueError.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    encoded = [encode_dialog(tokenizer, messages).ids for messages in dialogs]
    limit = model.config.max_seq_len
    for index, ids in enumerate(encoded):
        if len(ids) > limit:
            raise ValueError(f"dialog {index} has {len(ids)} tokens, more than the model's context of {limit}")
    device = model.head.weight.device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    rewards = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        lengths = torch.tensor([len(encoded[i]) for i in chunk])
        tokens = torch.full((len(chunk), int(lengths.max())), tokenizer.eos_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens[row, : len(encoded[i])] = torch.tensor(encoded[i])
        for i, reward in zip(chunk, model.score(tokens.to(device), lengths).tolist(), strict=True):
            rewards[i] = reward
    return rewards


def score_file(cfg: DictConfig) -> tuple[Path, int, dict[str, int]]:
    """Score ``cfg.input`` with ``cfg.model_dir``; returns (output file, lines scored, skips per reason)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: use fp32 or bf16")
    model_dir, source = resolve(cfg.model_dir), resolve(cfg.input)
    if gguf.is_gguf(model_dir):
        raise ValueError(f"model_dir={cfg.model_dir} is a GGUF file, which holds a language model, not a reward "
                         "model: train one from it (stage=reward stage.init_from=<the .gguf file>) and score with "
                         "its export")
    if not source.is_file():
        raise FileNotFoundError(f"input={source} is not a file; give a jsonl file of dialogs")
    model = hf.load_reward_model(model_dir, dtype=DTYPES[cfg.dtype], device=cfg.device).eval()
    tokenizer = Tokenizer.load(resolve(cfg.tokenizer) if cfg.tokenizer else model_dir)
    skipped: Counter[str] = Counter()

    def skip(error: BadInputError) -> None:
        skipped[error.reason] += 1
        if skipped.total() <= 10:
            logger.warning("skipped %s", error)

    dialogs = []
    for dialog in jsonl_dialogs(source, on_bad_input=skip):
        if dialog.messages[-1]["role"] != "assistant":
            skip(BadInputError(f"{dialog.id}: the dialog does not end with an assistant message, so it has no "
                               "response to score", "no_response", dialog.id))
            continue
        length = len(encode_dialog(tokenizer, dialog.messages).ids)
        if length > model.config.max_seq_len:
            skip(BadInputError(f"{dialog.id}: {length} tokens, longer than the model's context of "
                               f"{model.config.max_seq_len}", "too_long", dialog.id))
            continue
        dialogs.append(dialog)
    if not dialogs:
        raise ValueError(f"{source} holds no dialog to score (skipped: {dict(skipped)})")
    rewards = score_dialogs(model, tokenizer, [d.messages for d in dialogs], int(cfg.batch_size))
    out = resolve(cfg.output) if cfg.output else source.with_name(source.stem + ".rewards.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for dialog, reward in zip(dialogs, rewards, strict=True):
            f.write(json.dumps({"id": dialog.id, "reward": reward, "messages": dialog.messages}) + "\n")
    return out, len(dialogs), dict(skipped)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="score")
def main(cfg: DictConfig) -> None:
    """Command-line entry; errors name the file and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out, count, skipped = score_file(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"herd.score: {err}", file=sys.stderr)
        sys.exit(2)
    note = f"; skipped {sum(skipped.values())} ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
    print(f"herd.score: scored {count} dialogs into {out}{note}")


if __name__ == "__main__":
    main()
