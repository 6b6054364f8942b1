"""Generate text with an exported model (a Hugging Face Llama directory) from the command line.

    python -m herd.generate model_dir=<exported model> prompt='What is a tuple?'
    python -m herd.generate model_dir=<exported model> 'prompt=[What is a tuple?,What is a set?]'
    python -m herd.generate model_dir=<exported model> prompt='def read_config(path):' chat=false
    python -m herd.generate model_dir=<exported model> prompt='Name a colour' num_samples=4 temperature=1.0

``chat=true`` (the default) sends each prompt as a user message in the model's chat format
(``chat_template``: Llama 3's for a tokenizer with its tokens, else the tokenizer's own template;
after ``system``, if given) and prints the assistant's answer; it stops at the format's end-of-turn
tokens (``<|eot_id|>``, ``<|im_end|>``, ...). ``chat=false`` continues the raw text (after the bos
token, when the tokenizer has one) until the eos token and prints the text with its continuation. All prompts and samples are
decoded in one batch (see ``configs/generate.yaml`` for every option). Mistakes in the options
or the model directory are reported as ``herd.generate: <message>`` with exit status 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import hydra
from omegaconf import DictConfig, ListConfig

from herd.cli import user_errors
from herd.inference import Loaded, chat_messages, decode_answers, load
from herd.presets import config_dir


def prompt_list(prompt) -> list[str]:
    """The ``prompt`` option as a list of strings (one string, or a list of them)."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple, ListConfig)) else [prompt]
    if not prompts:
        raise ValueError("prompt is an empty list: give at least one prompt")
    return [str(p) for p in prompts]


def encode_prompt(loaded: Loaded, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of one prompt: a user message in the chat format (chat), or the bos token (if any) + text."""
    if not chat:
        return loaded.tokenizer.with_bos(loaded.tokenizer.encode(text))
    return loaded.chat.prompt_ids(chat_messages(text, system))


def run(cfg: DictConfig) -> list[str]:
    """Load, encode, decode every prompt and sample in one batch; the output texts, prompt-major."""
    prompts = prompt_list(cfg.prompt)
    loaded = load(str(cfg.model_dir), cfg.tokenizer, str(cfg.dtype), str(cfg.device), cfg.get("quantize"),
                  str(cfg.get("chat_template", "auto")))
    tok, chat = loaded.tokenizer, bool(cfg.chat)
    stop_ids = list(loaded.chat.stop_ids) if chat else [tok.eos_id]
    ids = [encode_prompt(loaded, text, chat, cfg.system) for text in prompts]
    answers = decode_answers(loaded.model, tok, ids, int(cfg.max_new_tokens), stop_ids=stop_ids,
                             num_samples=int(cfg.num_samples), temperature=float(cfg.temperature),
                             top_p=float(cfg.top_p), top_k=int(cfg.top_k), seed=int(cfg.seed),
                             compile=bool(cfg.compile))
    texts = [answer.text for samples in answers for answer in samples]
    if chat:
        return [text.strip() for text in texts]
    k = int(cfg.num_samples)
    return [prompts[row // k] + text for row, text in enumerate(texts)]


def format_outputs(texts: Sequence[str], n_prompts: int, num_samples: int) -> str:
    """One output as it is; several under a ``--- prompt i, sample j ---`` line each."""
    if len(texts) == 1:
        return texts[0]
    blocks = []
    for row, text in enumerate(texts):
        header = f"--- prompt {row // num_samples + 1}/{n_prompts}"
        if num_samples > 1:
            header += f", sample {row % num_samples + 1}/{num_samples}"
        blocks.append(f"{header} ---\n{text}")
    return "\n".join(blocks)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="generate")
def main(cfg: DictConfig) -> None:
    """Command-line entry: prints the outputs; user errors exit with status 2."""
    with user_errors("herd.generate"):
        texts = run(cfg)
        n_prompts = len(prompt_list(cfg.prompt))
    print(format_outputs(texts, n_prompts, int(cfg.num_samples)))


if __name__ == "__main__":
    main()

