"""Generate text with an exported model (a Hugging Face Llama directory) from the command line.

    python -m herd.generate model_dir=<exported model> prompt='What is a tuple?'
    python -m herd.generate model_dir=<exported model> 'prompt=[What is a tuple?,What is a set?]'
    python -m herd.generate model_dir=<exported model> prompt='def read_config(path):' chat=false
    python -m herd.generate model_dir=<exported model> prompt='Name a colour' num_samples=4 temperature=1.0

``chat=true`` (the default) sends each prompt as a user message in the Llama 3 chat format
(after ``system``, if given) and prints the assistant's answer; it stops at ``<|eot_id|>`` or
``<|eom_id|>``. ``chat=false`` continues the raw text (``<|begin_of_text|>`` + text) until
``<|end_of_text|>`` and prints the text with its continuation. All prompts and samples are
decoded in one batch (see ``configs/generate.yaml`` for every option). Mistakes in the options
or the model directory are reported as ``herd.generate: <message>`` with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import MissingMandatoryValue

from herd.data.chat import encode_dialog
from herd.data.tokenizer import Tokenizer
from herd.interop import gguf, hf
from herd.model import Transformer, generate
from herd.model.quantize import check_quantize
from herd.model.quantize import quantize as quantize_model
from herd.paths import resolve
from herd.presets import config_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Loaded:
    """A model ready for decoding and its tokenizer."""

    model: Transformer
    tokenizer: Tokenizer


def load(model_dir: str, tokenizer: str | None = None, dtype: str = "fp32", device: str = "cpu",
         quantize: str | None = None) -> Loaded:
    """Load an exported model in ``dtype`` (fp32 or bf16) and its tokenizer (``model_dir``'s by default).

    ``model_dir`` may be a llama.cpp ``.gguf`` file: it is converted once (:mod:`herd.interop.gguf`).

    ``quantize="fp8_rowwise"`` then quantizes the feed-forward layers of every block but the first
    and the last to FP8 (see :mod:`herd.model.quantize`); None keeps every weight in ``dtype``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use fp32 or bf16")
    check_quantize(quantize)
    model_path = gguf.model_dir(resolve(model_dir))
    if not model_path.is_dir():
        raise FileNotFoundError(f"model_dir {model_path} is not a directory; pass an exported model directory "
                                "or a .gguf file")
    tokenizer_path = resolve(tokenizer) if tokenizer else model_path
    if not (tokenizer_path / "tokenizer.json").is_file() and not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} has no tokenizer.json: pass tokenizer=<tokenizer folder>")
    loaded_tokenizer = Tokenizer.load(tokenizer_path)
    model = quantize_model(hf.load(model_path, dtype=DTYPES[dtype], device=device).eval(), quantize)
    if loaded_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {loaded_tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}: use the tokenizer the model was trained with")
    return Loaded(model, loaded_tokenizer)


def chat_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that end an assistant turn: ``<|eot_id|>``, ``<|eom_id|>`` (and ``<|end_of_text|>``)."""
    names = ("eot_id", "eom_id", "end_of_text")
    return [tokenizer.special_ids[name] for name in names if name in tokenizer.special_ids]


def prompt_list(prompt) -> list[str]:
    """The ``prompt`` option as a list of strings (one string, or a list of them)."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple, ListConfig)) else [prompt]
    if not prompts:
        raise ValueError("prompt is an empty list: give at least one prompt")
    return [str(p) for p in prompts]


def encode_prompt(tokenizer: Tokenizer, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of one prompt: a user message (chat) or ``<|begin_of_text|>`` + text."""
    if not chat:
        return [tokenizer.bos_id, *tokenizer.encode(text)]
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return encode_dialog(tokenizer, messages, add_generation_prompt=True).ids


def answer_text(tokenizer: Tokenizer, new_tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Decoded new tokens without the stop token that ended them."""
    if new_tokens and new_tokens[-1] in stop_ids:
        new_tokens = new_tokens[:-1]
    return tokenizer.decode(new_tokens)


def run(cfg: DictConfig) -> list[str]:
    """Load, encode, decode every prompt and sample in one batch; the output texts, prompt-major."""
    prompts = prompt_list(cfg.prompt)
    loaded = load(str(cfg.model_dir), cfg.tokenizer, str(cfg.dtype), str(cfg.device), cfg.get("quantize"))
    tok, chat = loaded.tokenizer, bool(cfg.chat)
    stop_ids = chat_stop_ids(tok) if chat else [tok.eos_id]
    ids = [encode_prompt(tok, text, chat, cfg.system) for text in prompts]
    outputs = generate(loaded.model, ids, int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                       top_p=float(cfg.top_p), top_k=int(cfg.top_k), stop_ids=stop_ids,
                       num_samples=int(cfg.num_samples), seed=int(cfg.seed), compile=bool(cfg.compile))
    texts = [answer_text(tok, new, stop_ids) for new in outputs]
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


def user_error(command: str, err: BaseException) -> str:
    """The one-line message for a mistake the user can fix."""
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key} is required: python -m {command} {err.full_key}=..."
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "missing key"
    return str(err)


USER_ERRORS = (OSError, ValueError, KeyError, MissingMandatoryValue)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="generate")
def main(cfg: DictConfig) -> None:
    """Command-line entry: prints the outputs; user errors exit with status 2."""
    try:
        texts = run(cfg)
        n_prompts = len(prompt_list(cfg.prompt))
    except USER_ERRORS as err:
        print(f"herd.generate: {user_error('herd.generate', err)}", file=sys.stderr)
        sys.exit(2)
    print(format_outputs(texts, n_prompts, int(cfg.num_samples)))


if __name__ == "__main__":
    main()

