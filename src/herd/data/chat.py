"""The Llama 3 dialog format, with the token masks that SFT and DPO need.

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from herd.data.tokenizer import Tokenizer

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
