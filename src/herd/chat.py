"""Chat with an exported model in the terminal, in its chat format (Llama 3's, or the tokenizer's template).

    python -m herd.chat model_dir=<exported model>
    python -m herd.chat model_dir=<exported model> system='You answer in one sentence.' temperature=0
    printf 'Hi!\\nWhat did I just say?\\n' | python -m herd.chat model_dir=<exported model>

Each line read is a user message; the answer is printed as it is decoded (``stream=false``:
when it is complete). The whole dialog so far (an optional ``system`` message, then every
exchange) is the prompt of each answer; when it no longer fits the model's context with room for
``max_new_tokens``, the oldest exchanges are forgotten. ``/reset`` forgets the history; ``/exit``
or the end of the input ends the chat. Input may come from a pipe. Mistakes in the options or
the model directory are reported as ``herd.chat: <message>`` with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from herd.cli import user_errors
from herd.data.chat import ChatFormat
from herd.inference import chat_messages, load
from herd.model import Transformer, stream
from herd.model.generate import check_sampling
from herd.presets import config_dir

EXIT_COMMANDS = ("/exit", "/quit")


class ChatSession:
    """A dialog with a model: the exchanges so far, and the prompt and answer of the next turn."""

    def __init__(
        self,
        model: Transformer,
        chat: ChatFormat,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.6,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> None:
        check_sampling(max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.model, self.chat, self.tokenizer, self.system = model, chat, chat.tokenizer, system
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        self.stop_ids = list(chat.stop_ids)
        self.generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
        self.history: list[tuple[str, str]] = []  # (user message, answer) per exchange, oldest first

    def messages(self, user: str) -> list[dict[str, Any]]:
        """The dialog whose answer comes next: system message, every exchange, then ``user``."""
        return chat_messages(user, self.system, self.history)

    def prompt_ids(self, user: str) -> list[int]:
        """Token ids of :meth:`messages` with the assistant's header, forgetting the oldest
        exchanges while the prompt and ``max_new_tokens`` do not fit the model's context."""
        context = self.model.config.max_seq_len
        while True:
            ids = self.chat.prompt_ids(self.messages(user))
            if len(ids) + self.max_new_tokens <= context or not self.history:
                break
            self.history.pop(0)
        if len(ids) >= context:
            raise ValueError(f"that message is too long: the prompt has {len(ids)} tokens and the model's "
                             f"context holds {context}; send a shorter one")
        return ids

    def reply(self, user: str) -> Iterator[str]:
        """The answer to ``user``, as pieces of text while it is decoded; then the exchange joins the history."""
        ids = self.prompt_ids(user)
        answer: list[int] = []
        shown = ""
        for token in stream(self.model, ids, self.max_new_tokens, stop_ids=self.stop_ids,
                            generator=self.generator, **self.sampling):
            if token in self.stop_ids:
                break
            answer.append(token)
            text = self.tokenizer.decode(answer)
            if not text.endswith("\ufffd"):  # else an incomplete UTF-8 character: wait for its other bytes
                yield text[len(shown) :]
                shown = text
        text = self.tokenizer.decode(answer)
        if text != shown:
            yield text[len(shown) :]
        self.history.append((user, text.strip()))

    def reset(self) -> None:
        """Forget every exchange (the system message stays)."""
        self.history.clear()


def converse(session: ChatSession, lines: Iterable[str], write: Callable[[str], Any], streaming: bool = True) -> None:
    """Answer each line of ``lines`` until they end or one is ``/exit``; ``/reset`` clears the history."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        try:
            if streaming:
                for piece in session.reply(text):
                    write(piece)
            else:
                write("".join(session.reply(text)))
        except ValueError as err:
            print(f"herd.chat: {err}", file=sys.stderr, flush=True)
            continue
        write("\n")


def input_lines() -> Iterator[str]:
    """Lines from stdin: with a ``> `` prompt in a terminal, plainly from a pipe or file."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    print("herd.chat: type a message; /reset forgets the dialog, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="chat")
def main(cfg: DictConfig) -> None:
    """Command-line entry: load the model, then chat until the input ends; user errors exit with status 2."""
    with user_errors("herd.chat"):
        loaded = load(str(cfg.model_dir), cfg.tokenizer, str(cfg.dtype), str(cfg.device), cfg.get("quantize"),
                      str(cfg.get("chat_template", "auto")))
        session = ChatSession(loaded.model, loaded.chat, system=cfg.system, max_new_tokens=int(cfg.max_new_tokens),
                              temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=int(cfg.top_k),
                              seed=int(cfg.seed))
    try:
        converse(session, input_lines(), _write, streaming=bool(cfg.stream))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
