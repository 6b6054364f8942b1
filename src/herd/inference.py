"""Using an exported model: loading a model directory, batched answers, reward scores.

What ``herd.generate``, ``herd.chat``, ``herd.score``, ``herd.evaluate`` and
``herd.rejection_sample`` share, so that each of them stays a thin command:

- :func:`load` (a policy and its tokenizer, checked against each other), :func:`load_model`,
  :func:`load_reward_model`, :func:`load_tokenizer`;
- :func:`chat_messages` and :func:`decode_answers`: prompts answered in batches (K samples of each
  from one prefill), each answer without its stop token; the prompts' ids and the stop ids come
  from the tokenizer's chat format (:attr:`Loaded.chat`, :func:`herd.data.chat.chat_format`);
- :func:`score_dialogs`: a reward model's score of each dialog, in batches of similar length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from herd.data.chat import ChatFormat, chat_format
from herd.data.tokenizer import Tokenizer
from herd.dtypes import FP32_BF16, torch_dtype
from herd.evaluation.reward import rewards
from herd.interop import gguf, hf
from herd.model import RewardModel, Transformer, generate
from herd.model.quantize import check_quantize, quantize
from herd.paths import resolve

Messages = list[dict[str, Any]]

# --- loading ------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model ready for decoding, its tokenizer, and the ``chat_template`` setting of its chat format."""

    model: Transformer
    tokenizer: Tokenizer
    chat_template: str = "auto"

    @property
    def chat(self) -> ChatFormat:
        """The tokenizer's chat format (built when first asked: a base model without a template needs none)."""
        if getattr(self, "_chat", None) is None:
            self._chat = chat_format(self.tokenizer, self.chat_template)
        return self._chat


def load(model_dir: str, tokenizer: str | None = None, dtype: str = "fp32", device: str = "cpu",
         quantize: str | None = None, chat_template: str = "auto") -> Loaded:
    """Load an exported model in ``dtype`` (fp32 or bf16) and its tokenizer (``model_dir``'s by default).

    ``model_dir`` may be a llama.cpp ``.gguf`` file: it is converted once (:mod:`herd.interop.gguf`).

    ``quantize="fp8_rowwise"`` then quantizes the feed-forward layers of every block but the first
    and the last to FP8 (see :mod:`herd.model.quantize`); None keeps every weight in ``dtype``.
    The tokenizer must not have more ids than the model.
    """
    torch_dtype(dtype, FP32_BF16)
    check_quantize(quantize)
    model_path = gguf.model_dir(resolve(model_dir))
    if not model_path.is_dir():
        raise FileNotFoundError(f"model_dir {model_path} is not a directory; pass an exported model directory "
                                "or a .gguf file")
    loaded_tokenizer = load_tokenizer(model_path, tokenizer)
    model = load_model(model_path, dtype, device, quantize)
    if loaded_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path(model_path, tokenizer)} has {loaded_tokenizer.vocab_size} ids "
                         f"but the model only {model.config.vocab_size}: use the tokenizer the model was trained with")
    return Loaded(model, loaded_tokenizer, str(chat_template))


def load_model(model_dir: str | Path, dtype: str = "fp32", device: str = "cpu",
               quantize_method: str | None = None) -> Transformer:
    """A Hugging Face Llama directory (or a ``.gguf`` file) as a herd Transformer in ``dtype`` (fp32 or bf16),
    in eval mode, its feed-forward layers quantized with ``quantize_method`` (None: not quantized)."""
    model = hf.load(gguf.model_dir(resolve(model_dir)), dtype=torch_dtype(dtype, FP32_BF16), device=device).eval()
    return quantize(model, quantize_method)


def load_reward_model(model_dir: str | Path, dtype: str = "fp32", device: str = "cpu") -> RewardModel:
    """A ``LlamaForSequenceClassification`` directory as a :class:`RewardModel` in ``dtype``, in eval mode."""
    return hf.load_reward_model(resolve(model_dir), dtype=torch_dtype(dtype, FP32_BF16), device=device).eval()


def tokenizer_path(model_dir: str | Path, tokenizer: str | None = None) -> Path:
    """``tokenizer`` (a folder or a tokenizer.json file) when given, else ``model_dir`` (a .gguf file's converted one)."""
    return resolve(tokenizer) if tokenizer else gguf.model_dir(resolve(model_dir))


def load_tokenizer(model_dir: str | Path, tokenizer: str | None = None) -> Tokenizer:
    """The tokenizer of :func:`tokenizer_path`; a folder without ``tokenizer.json`` is refused with the fix."""
    path = tokenizer_path(model_dir, tokenizer)
    if not (path / "tokenizer.json").is_file() and not path.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: pass tokenizer=<tokenizer folder>")
    return Tokenizer.load(path)


# --- answers ------------------------------------------------------------------------------------


def chat_messages(user: str, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> Messages:
    """The dialog whose answer comes next: the system message (if any), each (user, answer) exchange, ``user``."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user})
    return messages


def answer_text(tokenizer: Tokenizer, new_tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Decoded new tokens without the stop token that ended them."""
    if new_tokens and new_tokens[-1] in stop_ids:
        new_tokens = new_tokens[:-1]
    return tokenizer.decode(new_tokens)


@dataclass(frozen=True)
class Answer:
    """One decoded answer: its text (without the stop token), whether a stop token ended it (else it
    was cut at ``max_new_tokens`` or the context), and how many tokens were generated."""

    text: str
    finished: bool
    tokens: int


def decode_answers(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int],
    num_samples: int = 1,
    batch_size: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    **sampling: Any,
) -> list[list[Answer]]:
    """``num_samples`` answers to each prompt (token ids), each prompt prefilled once; in prompt order.

    ``batch_size=None`` decodes every prompt in one batch, in the given order; otherwise prompts are
    sorted by length and decoded ``batch_size`` at a time. ``on_batch(prompts, tokens)`` is called
    after each batch. ``sampling`` goes to :func:`herd.model.generate` (``temperature``, ``top_p``,
    ``top_k``, ``generator`` or ``seed``, ``compile``).
    """
    if batch_size is None:
        order, batch_size = list(range(len(prompts))), max(1, len(prompts))
    else:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = model.tok_embeddings.weight.device
    out: list[list[Answer]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = generate(model, [torch.tensor(list(prompts[i]), device=device) for i in chunk], max_new_tokens,
                        stop_ids=stop_ids, num_samples=num_samples, **sampling)
        for position, i in enumerate(chunk):
            out[i] = [Answer(answer_text(tokenizer, new, stop_ids), bool(new) and new[-1] in stop_ids, len(new))
                      for new in rows[position * num_samples : (position + 1) * num_samples]]
        if on_batch is not None:
            on_batch(len(chunk), sum(len(new) for new in rows))
    return out


# --- reward scores ------------------------------------------------------------------------------


@torch.no_grad()
def score_dialogs(
    model: RewardModel, chat: ChatFormat, dialogs: Sequence[Messages], batch_size: int = 16
) -> list[float]:
    """The reward of each dialog (lists of messages ending with the assistant's), in order.

    Dialogs are sorted by length and scored ``batch_size`` at a time, right-padded; the reward is
    read at the end-of-turn token of each dialog's last message (:meth:`ChatFormat.response_ids`).
    A dialog longer than the model's context raises ValueError.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    encoded = [chat.response_ids(messages) for messages in dialogs]
    limit = model.config.max_seq_len
    for index, ids in enumerate(encoded):
        if len(ids) > limit:
            raise ValueError(f"dialog {index} has {len(ids)} tokens, more than the model's context of {limit}")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores = [0.0] * len(encoded)
    for i, reward in zip(order, rewards(model, [encoded[i] for i in order], batch_size), strict=True):
        scores[i] = reward
    return scores
