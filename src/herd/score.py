"""Score dialogs with a reward model (a ``LlamaForSequenceClassification`` directory) from the command line.

    python -m herd.score model_dir=logs/tiny_reward/runs/<run>/export input=dialogs.jsonl
    python -m herd.score model_dir=... input=dialogs.jsonl output=scored.jsonl batch_size=32 dtype=bf16

Each input line is a dialog in the format ``herd.prepare`` reads (``{"messages": [...]}``, or
``{"prompt": ..., "completion": ...}``) that ends with an assistant message. It is encoded in the
model's chat format (``chat_template``), through that message's end-of-turn token (``<|eot_id|>``,
``<|im_end|>``, ...), where the reward is read.
Dialogs are scored in batches of similar length; each output line is ``{"id": "<file>:<line>",
"reward": r, "messages": [...]}``, in input order. Lines that are not usable dialogs, or longer
than the model's context, are skipped and counted, each named by file and line in the log.
Mistakes in the options, the model directory or the input are reported as
``herd.score: <message>`` with exit status 2.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

from herd.cli import user_errors
from herd.data.chat import chat_format
from herd.data.inputs import BadInputError
from herd.data.kinds.dialog import jsonl_dialogs
from herd.dtypes import FP32_BF16, torch_dtype
from herd.inference import load_reward_model, load_tokenizer, score_dialogs
from herd.interop import gguf
from herd.paths import resolve
from herd.presets import config_dir

logger = logging.getLogger(__name__)


def score_file(cfg: DictConfig) -> tuple[Path, int, dict[str, int]]:
    """Score ``cfg.input`` with ``cfg.model_dir``; returns (output file, lines scored, skips per reason)."""
    torch_dtype(cfg.dtype, FP32_BF16)
    source = resolve(cfg.input)
    if gguf.is_gguf(resolve(cfg.model_dir)):
        raise ValueError(f"model_dir={cfg.model_dir} is a GGUF file, which holds a language model, not a reward "
                         "model: train one from it (stage=reward stage.init_from=<the .gguf file>) and score with "
                         "its export")
    if not source.is_file():
        raise FileNotFoundError(f"input={source} is not a file; give a jsonl file of dialogs")
    model = load_reward_model(cfg.model_dir, cfg.dtype, cfg.device)
    tokenizer = load_tokenizer(cfg.model_dir, cfg.tokenizer)
    chat = chat_format(tokenizer, str(cfg.get("chat_template", "auto")))
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
        length = len(chat.response_ids(dialog.messages))
        if length > model.config.max_seq_len:
            skip(BadInputError(f"{dialog.id}: {length} tokens, longer than the model's context of "
                               f"{model.config.max_seq_len}", "too_long", dialog.id))
            continue
        dialogs.append(dialog)
    if not dialogs:
        raise ValueError(f"{source} holds no dialog to score (skipped: {dict(skipped)})")
    rewards = score_dialogs(model, chat, [d.messages for d in dialogs], int(cfg.batch_size))
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
    with user_errors("herd.score", (FileNotFoundError, ValueError)):
        out, count, skipped = score_file(cfg)
    note = f"; skipped {sum(skipped.values())} ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
    print(f"herd.score: scored {count} dialogs into {out}{note}")


if __name__ == "__main__":
    main()
