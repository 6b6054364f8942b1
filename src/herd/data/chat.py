"""Chat formats: how dialogs become token ids and masks, for Llama 3 and for any chat template.

Every consumer of dialogs (prepare, SFT, reward, DPO, score, generate, chat, rejection sampling,
evaluation, the pipeline) asks one :class:`ChatFormat`, made by :func:`chat_format` from the
tokenizer folder. It gives a dialog's ids with its masks (:meth:`ChatFormat.encode`), the ids of
a prompt for generation (:meth:`ChatFormat.prompt_ids`), the ids that end generation
(:attr:`ChatFormat.stop_ids`) and the token that ends a response (:attr:`ChatFormat.response_end_id`,
where a reward head reads). Two formats exist:

- :class:`Llama3Format` (herd's default for tokenizers with Llama 3's special tokens), below;
- :class:`TemplateFormat`: the tokenizer's own Jinja chat template (ChatML, Llama 2's ``[INST]``,
  Llama 3.1 Instruct's, ...) or a ``.jinja`` file, rendered by ``transformers``'
  ``apply_chat_template`` so that the ids are the ones a server using that template sends.
  Special-token strings inside message content stay plain text (``sanitize_control_tokens``).

The Llama 3 dialog format:

A dialog is a list of messages ``{"role": ..., "content": ...}`` with roles system, user,
assistant and ipython (tool output). It is encoded exactly as Llama 3 does::

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     (per message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                     (generation prompt)

Content is stripped of surrounding whitespace, as in Meta's reference code and the official chat
template. Optional message keys:

- ``"python_tag": True``: a tool call; ``<|python_tag|>`` precedes the content and the message
  ends with ``<|eom_id|>`` (the model waits for the tool's ipython answer).
- ``"eom": True / False``: end with ``<|eom_id|>`` / ``<|eot_id|>`` regardless of python_tag.

Masks (one bool per token):

- ``role_mask``: tokens the selected roles wrote: their content, the ``<|python_tag|>`` of a tool
  call, and the closing ``<|eot_id|>``/``<|eom_id|>``, since the model must learn when to stop.
  Headers are not included. SFT trains on this mask.
- ``format_mask``: formatting tokens: ``<|begin_of_text|>``, every header (start/end header ids,
  the role name, the blank line) and every ``<|eot_id|>``/``<|eom_id|>``. DPO trains on
  ``role_mask & ~format_mask``, as the Llama 3 paper masks header and termination tokens.

The same format as a Jinja template is :data:`herd.data.tokenizer.LLAMA3_CHAT_TEMPLATE`, which
herd's tokenizers save in their ``tokenizer_config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from herd.data.tokenizer import Tokenizer

# chat_template values: auto = Llama 3's format when the tokenizer has its tokens, else the
# tokenizer's own template; herd = Llama 3's format; tokenizer = the tokenizer's template; or the
# path of a .jinja file.
CHAT_TEMPLATES = ("auto", "herd", "tokenizer")


class ChatFormatError(ValueError):
    """A tokenizer, template or dialog that no chat format can encode; the message says what to change."""


class ChatTemplateError(ChatFormatError):
    """A chat template that cannot serve training at all (not only one dialog): it needs another template."""

ROLES = ("system", "user", "assistant", "ipython")

@dataclass(frozen=True)
class EncodedDialog:
    """Token ids of a dialog and two masks of the same length (see the module docstring)."""

    ids: list[int]
    role_mask: list[bool]
    format_mask: list[bool]


def render_dialog(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """The dialog as Llama 3 format text (special tokens written as their strings)."""
    parts = ["<|begin_of_text|>"]
    for message in _checked(messages):
        parts.append(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n")
        if message.get("python_tag", False):
            parts.append("<|python_tag|>")
        parts.append(message["content"].strip())
        parts.append("<|eom_id|>" if _ends_with_eom(message) else "<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def encode_dialog(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    roles: Sequence[str] = ("assistant",),
) -> EncodedDialog:
    """Encode a dialog in the Llama 3 format; ``role_mask`` marks what ``roles`` wrote."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"encode_dialog(roles=...): {sorted(unknown)} are not roles; use some of {ROLES}")
    out = _Builder(tokenizer)
    out.special("begin_of_text", role=False, fmt=True)
    for message in _checked(messages):
        selected = message["role"] in roles
        out.header(message["role"])
        if message.get("python_tag", False):
            out.special("python_tag", role=selected, fmt=False)
        out.text(message["content"].strip(), role=selected, fmt=False)
        out.special("eom_id" if _ends_with_eom(message) else "eot_id", role=selected, fmt=True)
    if add_generation_prompt:
        out.header("assistant")
    return EncodedDialog(out.ids, out.role_mask, out.format_mask)


class _Builder:
    """Accumulates ids and both masks piece by piece."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.role_mask: list[bool] = []
        self.format_mask: list[bool] = []

    def add(self, ids: list[int], role: bool, fmt: bool) -> None:
        """Append ``ids`` with both mask values."""
        self.ids += ids
        self.role_mask += [role] * len(ids)
        self.format_mask += [fmt] * len(ids)

    def special(self, name: str, role: bool, fmt: bool) -> None:
        """Append one special token by herd name."""
        self.add([self.tokenizer.special_id(name)], role, fmt)

    def text(self, text: str, role: bool, fmt: bool) -> None:
        """Append the tokens of plain text."""
        self.add(self.tokenizer.encode(text), role, fmt)

    def header(self, role: str) -> None:
        """Append ``<|start_header_id|>role<|end_header_id|>\\n\\n`` (all formatting)."""
        self.special("start_header_id", role=False, fmt=True)
        self.text(role, role=False, fmt=True)
        self.special("end_header_id", role=False, fmt=True)
        self.text("\n\n", role=False, fmt=True)


def _ends_with_eom(message: Mapping[str, Any]) -> bool:
    return bool(message.get("eom", message.get("python_tag", False)))


def _checked(messages: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """``messages`` if well formed; else a ValueError naming the bad message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"a dialog is a list of messages, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"message {index} is a {type(message).__name__}, not a {{role, content}} mapping"
            )
        if message.get("role") not in ROLES:
            raise ValueError(f"message {index}: role {message.get('role')!r} is not one of {ROLES}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} ({message['role']}): content must be a string")
    return messages


# --- chat formats ---------------------------------------------------------------------------------


class ChatFormat:
    """A tokenizer's chat format: dialog ids and masks, generation prompts, stop ids, the response end.

    ``encode(messages)`` returns an :class:`EncodedDialog` whose ``role_mask`` covers each
    assistant message's content and the tokens through its end-of-turn, and whose ``format_mask``
    covers everything the template adds around the content (DPO scores ``role & ~format``; outside
    the role mask the format mask is not used, and a template format leaves it true there).
    """

    name = "chat"
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    response_end_id: int

    def encode(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> EncodedDialog:
        """Ids and masks of a dialog (with the assistant header after it when ``add_generation_prompt``)."""
        raise NotImplementedError

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The ids a model continues to answer ``messages``: the dialog and the assistant's header."""
        return self.encode(messages, add_generation_prompt=True).ids

    def response_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The ids a reward model scores for a dialog that ends with an assistant message.

        The dialog through the answer's end-of-turn token (the template's text after it, such as
        ChatML's newline, is left out), less trailing padding ids: the reward head reads the last of
        these ids, as ``transformers``' ``LlamaForSequenceClassification`` reads the last token that
        is not its ``pad_token_id`` (herd's exports write the tokenizer's pad id there). So with
        Llama 3's format the reward is read at ``<|eot_id|>``; where the pad token is the end-of-turn
        token itself (ChatML models whose pad is ``<|im_end|>``), at the answer's last token.
        """
        if not messages or messages[-1].get("role") != "assistant":
            raise ChatFormatError("a scored dialog must end with the assistant's message")
        encoded = self.encode(messages)
        return encoded.ids[: self.scored_length(encoded)]

    def scored_length(self, encoded: EncodedDialog) -> int:
        """How many of ``encoded``'s ids :meth:`response_ids` keeps (through the last answer, less trailing pads)."""
        end = max(i for i, in_role in enumerate(encoded.role_mask) if in_role) + 1
        pad = self.tokenizer.pad_id
        while end > 1 and encoded.ids[end - 1] == pad:
            end -= 1
        return end

    def describe(self) -> str:
        """One line for logs: the format and its stop tokens."""
        stops = ", ".join(self.tokenizer.decode([i]) for i in self.stop_ids)
        return f"{self.name} chat format (stops at {stops})"


class Llama3Format(ChatFormat):
    """Llama 3's format (see the module docstring), with special tokens entered by id."""

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not tokenizer.llama3_format:
            raise ChatFormatError(
                f"chat_template=herd needs Llama 3's special tokens, which tokenizer {tokenizer.source} lacks; use "
                "chat_template=auto (its own chat template) or the path of a .jinja template"
            )
        self.tokenizer = tokenizer
        names = ("eot_id", "eom_id", "end_of_text")
        self.stop_ids = tuple(tokenizer.special_ids[name] for name in names if name in tokenizer.special_ids)
        self.response_end_id = tokenizer.special_ids["eot_id"]

    def encode(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> EncodedDialog:
        """:func:`encode_dialog` with the assistant's mask."""
        return encode_dialog(self.tokenizer, messages, add_generation_prompt)


class TemplateFormat(ChatFormat):
    """A Jinja chat template rendered by ``transformers``: the ids are ``apply_chat_template``'s.

    Masks: for each assistant message ``k``, its text runs from the end of the rendering of
    ``messages[:k]`` with the generation prompt (the header the template writes before an
    assistant's content) to the end of the rendering of ``messages[:k+1]``; its tokens are those
    whose characters overlap that text. The first stop token among them ends the turn: the role
    mask covers the message's tokens through it, and the format mask everything outside its
    content. That needs each prefix of a dialog to render as a prefix of the whole dialog; a
    template that rewrites earlier turns is refused.

    The stop ids are the end-of-turn token the template writes after an assistant message, the
    tokenizer's eos token, and the ids of ``generation_config.json``'s ``eos_token_id``.
    """

    name = "template"

    def __init__(self, tokenizer: Tokenizer, template: str | None = None, where: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template if template is not None else tokenizer.chat_template
        self.where = where or tokenizer.source
        if not self.template:
            fix = ("use chat_template=herd (Llama 3's format: the tokenizer has its tokens) or chat_template=<path of "
                   "a .jinja template>") if tokenizer.llama3_format else ("it lacks Llama 3's special tokens too: set "
                   "chat_template=<path of a .jinja template>, or use a tokenizer folder that has a template")
            raise ChatFormatError(f"tokenizer {tokenizer.source} has no chat template (none in tokenizer_config.json "
                                  f"or chat_template.jinja); {fix}")
        self.hf = tokenizer.to_transformers()
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        start = len(self._ids(probe[:1], True))
        full = self._ids(probe)
        added = set(self.hf.all_special_ids) | {int(i) for i in self.hf.added_tokens_decoder}
        ends = [i for i in full[start:] if i in added]
        stops = [*ends[:1], *tokenizer.generation_eos_ids]
        eos = self.hf.eos_token_id
        stops += [eos] if isinstance(eos, int) else []
        if not ends:
            raise ChatFormatError(
                f"the chat template of {self.where} ends an assistant message with no special token, so generation "
                "could never stop at the end of a turn; use a template that closes each turn with one"
            )
        self.response_end_id = ends[0]
        self.stop_ids = tuple(dict.fromkeys(int(i) for i in stops))

    def _apply(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, tokenize: bool):
        from jinja2 import TemplateError

        try:
            return self.hf.apply_chat_template(
                [dict(m) for m in messages], chat_template=self.template, tokenize=tokenize,
                add_generation_prompt=add_generation_prompt, return_dict=False,
                **({"sanitize_control_tokens": True} if tokenize else {}),
            )  # fmt: skip
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
            raise ChatFormatError(f"the chat template of {self.where} cannot render this dialog ({err})") from None

    def _ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        return [int(i) for i in self._apply(messages, add_generation_prompt, tokenize=True)]

    def _text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        return self._apply(messages, add_generation_prompt, tokenize=False)

    def encode(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> EncodedDialog:
        """Ids (``apply_chat_template``'s) and masks of a dialog; see the class docstring."""
        messages = _checked(messages)
        ids = self._ids(messages, add_generation_prompt)
        spans = self._assistant_spans(messages, ids, add_generation_prompt)
        role = [False] * len(ids)
        fmt = [True] * len(ids)
        for k, (first, last, content) in spans.items():
            stop = next((i for i in range(first, last) if ids[i] in self.stop_ids), None)
            if stop is None:
                raise ChatTemplateError(f"the chat template of {self.where} does not close assistant message {k} with "
                                      f"one of the stop tokens {list(self.stop_ids)}")
            role[first : stop + 1] = [True] * (stop + 1 - first)
            for i in range(first, stop) if content is None else content:
                fmt[i] = False
        return EncodedDialog(ids, role, fmt)

    def _assistant_spans(self, messages: Sequence[Mapping[str, Any]], ids: list[int],
                         add_generation_prompt: bool) -> dict[int, tuple[int, int, list[int] | None]]:
        """Token range ``[first, last)`` of each assistant message ``k``, and its content's tokens.

        The content's tokens are those overlapping the message's (stripped) content in the
        rendering; None when it cannot be found there (a template that rewrites content), and then
        every token before the end-of-turn counts as content.

        The ranges are found in characters (the rendering of ``messages[:k]`` with the generation
        prompt, then of ``messages[:k+1]``, must be prefixes of the whole rendering) and mapped to
        tokens by their offsets. When content held special-token strings (encoded as plain text,
        so the offsets of a plain encoding no longer apply), the token renderings of the prefixes
        are used instead, and must be prefixes of the whole dialog's ids.
        """
        assistants = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
        if assistants and assistants[0] == 0:
            raise ChatFormatError(
                "a dialog cannot start with an assistant message under a chat template (there is no prompt "
                "before it); start with a system or user message"
            )
        text = self._text(messages, add_generation_prompt)
        encoding = self.hf.backend_tokenizer.encode(text, add_special_tokens=False)
        by_offsets = list(encoding.ids) == ids
        spans = {}
        for k in assistants:
            if by_offsets:
                bounds = [self._text(messages[:k], True), self._text(messages[: k + 1])]
                if not all(text.startswith(prefix) for prefix in bounds):
                    self._refuse_prefix()
                start, end = (len(prefix) for prefix in bounds)
                tokens = [i for i, (a, b) in enumerate(encoding.offsets) if b > start and a < end]
                content = messages[k]["content"].strip()
                at = text.find(content, start, end) if content else -1
                inside = None if at < 0 else [i for i in tokens if encoding.offsets[i][1] > at
                                               and encoding.offsets[i][0] < at + len(content)]
                spans[k] = (tokens[0], tokens[-1] + 1, inside) if tokens else (0, 0, None)
            else:
                start, end = self._ids(messages[:k], True), self._ids(messages[: k + 1])
                if ids[: len(start)] != start or ids[: len(end)] != end:
                    self._refuse_prefix()
                spans[k] = (len(start), len(end), None)
        return spans

    def _refuse_prefix(self) -> None:
        raise ChatTemplateError(
            f"the chat template of {self.where} renders the start of a dialog as something other than a prefix of the "
            "whole dialog, so the assistant's tokens cannot be located; use a template that renders each message "
            "after the previous ones without changing them"
        )


def chat_format(tokenizer: Tokenizer, chat_template: str = "auto") -> ChatFormat:
    """The chat format for ``tokenizer`` and a ``chat_template`` setting (see :data:`CHAT_TEMPLATES`).

    ``auto``: Llama 3's format when the tokenizer has its special tokens, else the tokenizer's own
    template. ``herd``: Llama 3's format. ``tokenizer``: the tokenizer's template. Any other value
    is the path of a ``.jinja`` template file. Raises :class:`ChatFormatError` naming the fix.
    """
    if chat_template == "herd":
        return Llama3Format(tokenizer)
    if chat_template == "auto":
        return Llama3Format(tokenizer) if tokenizer.llama3_format else TemplateFormat(tokenizer)
    if chat_template == "tokenizer":
        return TemplateFormat(tokenizer)
    path = Path(str(chat_template)).expanduser()
    if path.suffix != ".jinja" or not path.is_file():
        raise ChatFormatError(
            f"chat_template={chat_template!r}: expected one of {CHAT_TEMPLATES} or the path of an existing .jinja file"
        )
    return TemplateFormat(tokenizer, path.read_text(encoding="utf-8"), where=str(path))
