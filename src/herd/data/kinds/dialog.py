"""Dialog sources for ``herd.prepare``: read, validate, encode with a loss mask, pack whole into rows.

A source with ``kind: dialog`` (and every source whose input is the embedded ``stdlib:sft``)
holds dialogs. Its inputs are:

- jsonl files (or folders of them: the files matching the source's ``glob``, default
  ``**/*.jsonl``), one dialog per line, in either layout::

      {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
      {"prompt": [messages] or "a user message", "completion": [messages] or "an assistant answer"}

  A ``prompt``/``completion`` line is the dialog ``prompt + completion``; a string prompt is one
  user message, a string completion one assistant message. A line may name its ``group`` (a
  string): the split is then assigned by hashing the group, so a group is held out whole.
- ``stdlib:sft``: questions about the standard library's functions answered by their docs
  (:mod:`herd.data.embedded.sft`), grouped by module. Options go in a query string:
  ``stdlib:sft?seed=1&per_definition=2&max_per_module=20&system=You+are+terse.``
- ``stdlib:transcripts``: the sentences of the embedded speech set (:mod:`herd.data.embedded.speech`)
  as text: "Transcribe: seven red up" answered "seven red up"; options as ``stdlib:speech``'s
  (``stdlib:transcripts?count=10000&seed=1``).

Messages follow :mod:`herd.data.chat`: roles system, user, assistant, ipython; string content;
optional booleans ``python_tag`` and ``eom``. A line that is not a usable dialog is a
:class:`~herd.data.inputs.BadInputError` naming ``file:line``, with a reason of
:data:`BAD_INPUT_REASONS`; dialog sources skip and count them by default (``on_bad_input``),
and fail when more than ``max_bad_fraction`` of a source's lines are bad.

Encoding (``chat_template``; see :func:`herd.data.chat.chat_format`):

- ``auto`` (default): the plain Llama 3 format (:func:`herd.data.chat.encode_dialog`) for a
  tokenizer with Llama 3's special tokens, else the tokenizer's own chat template;
- ``herd``: the plain Llama 3 format, whatever the tokenizer's own template;
- ``tokenizer``: the chat template of the tokenizer folder (``chat_template`` in its
  tokenizer_config.json or ``chat_template.jinja``, e.g. Llama 3.1 Instruct's, which adds a
  system preamble with a knowledge-cutoff date, or a ChatML model's), rendered by
  ``transformers``' ``apply_chat_template``, so that the ids are those a server using the same
  template produces;
- the path of a ``.jinja`` file: that template.

Special-token strings written in message content stay plain text in every format. The loss mask
is true exactly on the tokens the assistant wrote: its content and its end-of-turn token
(``<|eot_id|>``/``<|eom_id|>``, ``<|im_end|>``, ``</s>``, ...).

Packing: dialogs are packed whole, several to a row of ``seq_len + 1`` tokens, first-fit
(:class:`herd.data.packing.WholePacker`), each with its own document id, the row's tail padded
(document id -1, loss mask 0). A dialog longer than a row is dropped or, with
``too_long: truncate``, cut to the row (dropped all the same when no assistant token is left);
both are counted in the manifest. Rows use the ``dialog`` layout of ``herd.data.shards.LAYOUTS``,
and are read at the stored seq_len.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.data.chat import CHAT_TEMPLATES, ROLES, ChatFormatError, ChatTemplateError, chat_format
from herd.data.inputs import (
    BadInputError,
    OnBadInput,
    binary_reason,
    jsonl_files,
    jsonl_records,
    query_options,
    raise_bad_input,
)
from herd.data.kinds import (
    BadInputs,
    Job,
    PrepareError,
    SourceSpec,
    assign_split,
    source_entry,
    splits_summary,
)
from herd.data.packing import WholePacker
from herd.data.shards import SPLITS

if TYPE_CHECKING:
    from herd.data.tokenizer import Tokenizer

STDLIB_SFT = "stdlib:sft"
STDLIB_TRANSCRIPTS = "stdlib:transcripts"
TOO_LONG = ("drop", "truncate")
# Why a line is not a usable dialog (BadInputError.reason); the first five are shared with text.
BAD_INPUT_REASONS = (
    "not_utf8", "malformed_json", "not_an_object", "binary", "too_long_line",
    "no_messages", "bad_message", "unknown_role", "empty_content", "no_assistant_turn", "template_error",
)  # fmt: skip
_SFT_OPTIONS = {"seed": int, "per_definition": int, "max_per_module": int, "system": str}
_MESSAGE_FLAGS = ("python_tag", "eom")
_OPEN_ROWS = 16  # rows the first-fit packer keeps open


@dataclass(frozen=True)
class Dialog:
    """One dialog: a stable id, its messages, and its group (None: the split follows the id)."""

    id: str
    messages: list[dict[str, Any]]
    group: str | None = None

    @property
    def split_key(self) -> str:
        """What the split is assigned by: the group when there is one, else the id."""
        return self.group if self.group is not None else self.id


@dataclass(frozen=True)
class EncodedDialog:
    """A dialog's token ids (uint32) and loss mask (bool, true on the assistant's tokens)."""

    ids: np.ndarray
    loss_mask: np.ndarray


# --- reading ------------------------------------------------------------------------------------


def iter_dialogs(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    glob: str = "**/*.jsonl",
    on_bad_input: OnBadInput = raise_bad_input,
) -> Iterator[Dialog]:
    """Dialogs of one source's inputs, in order: jsonl files, folders of them, ``stdlib:sft``.

    A line that is not a usable dialog goes to ``on_bad_input`` (which raises by default); if it
    returns, the line is skipped. Missing inputs raise FileNotFoundError.
    """
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        item = str(item)
        if item == STDLIB_SFT or item.startswith(STDLIB_SFT + "?"):
            yield from _stdlib_dialogs(item, on_bad_input)
            continue
        if item == STDLIB_TRANSCRIPTS or item.startswith(STDLIB_TRANSCRIPTS + "?"):
            yield from _transcript_dialogs(item)
            continue
        for file, file_id in jsonl_files(item, glob, f"{STDLIB_SFT!r} for the embedded dialogs"):
            yield from jsonl_dialogs(file, file_id, on_bad_input)


def jsonl_dialogs(
    path: Path, file_id: str | None = None, on_bad_input: OnBadInput = raise_bad_input
) -> Iterator[Dialog]:
    """One dialog per non-blank line of a jsonl file (id ``file_id:line``); bad lines named ``file:line``."""
    file_id = file_id or path.name
    for line_number, record in jsonl_records(path, on_bad_input, "'messages' (or 'prompt' and 'completion')"):
        try:
            yield record_dialog(record, f"{path}:{line_number}", f"{file_id}:{line_number}")
        except BadInputError as err:
            on_bad_input(err)


def record_dialog(record: Mapping[str, Any], where: str, dialog_id: str) -> Dialog:
    """The dialog of one jsonl object (``messages``, or ``prompt`` + ``completion``), checked.

    Raises BadInputError located at ``where`` for anything that is not a usable dialog.
    """
    if "messages" in record:
        messages = record["messages"]
        if isinstance(messages, list) and not messages:
            raise _bad(where, "no_messages", "'messages' is empty")
        if not isinstance(messages, list):
            raise _bad(
                where, "bad_message", f"'messages' must be a list of messages, got {type(messages).__name__}"
            )
    elif "prompt" in record or "completion" in record:
        missing = [key for key in ("prompt", "completion") if key not in record]
        if missing:
            raise _bad(
                where, "no_messages", f"a prompt/completion line needs both fields, {missing[0]!r} is missing"
            )
        messages = _turns(record["prompt"], "user", where, "prompt") + _turns(
            record["completion"], "assistant", where, "completion"
        )
    else:
        raise _bad(
            where,
            "no_messages",
            f"no 'messages' (or 'prompt' and 'completion') field (fields: {sorted(record)})",
        )
    group = record.get("group")
    if group is not None and (not isinstance(group, str) or not group):
        raise _bad(where, "bad_message", f"'group' must be a non-empty string, got {group!r}")
    return Dialog(dialog_id, checked_messages(messages, where), group)


def _turns(value: Any, role: str, where: str, key: str) -> list[Any]:
    """A prompt or completion as messages: a string is one message of ``role``."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return list(value)
    raise _bad(
        where, "bad_message", f"{key!r} must be a string or a list of messages, got {type(value).__name__}"
    )


def checked_messages(
    messages: Sequence[Any], where: str, need_assistant: bool = True, example: str = "dialog"
) -> list[dict[str, Any]]:
    """Messages reduced to role, content and the chat flags, or a BadInputError naming the problem.

    With ``need_assistant`` (the default) a dialog without an assistant message is refused too
    (reason ``no_assistant_turn``); a preference ranking's prompt is checked without it.
    ``example`` names what the messages belong to in error messages ("not a usable dialog: ...").
    """
    bad = partial(_bad, example=example)
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise bad(
                where,
                "bad_message",
                f"message {index} is a {type(message).__name__}, not a {{role, content}} object",
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise bad(where, "bad_message", f"message {index} has no string 'role'")
        if role not in ROLES:
            raise bad(where, "unknown_role", f"message {index}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise bad(where, "bad_message", f"message {index} ({role}): 'content' must be a string")
        if not content.strip():
            raise bad(where, "empty_content", f"message {index} ({role}) has empty content")
        if why := binary_reason(content):
            raise bad(where, "binary", f"message {index} ({role}): the content is not text ({why})")
        flags = {key: message[key] for key in _MESSAGE_FLAGS if key in message}
        if any(not isinstance(value, bool) for value in flags.values()):
            raise bad(
                where, "bad_message", f"message {index} ({role}): python_tag and eom must be true or false"
            )
        out.append({"role": role, "content": content, **flags})
    if need_assistant and not any(message["role"] == "assistant" for message in out):
        raise bad(where, "no_assistant_turn", "no assistant message, so nothing to train on")
    return out


def _bad(where: str, reason: str, what: str, example: str = "dialog") -> BadInputError:
    return BadInputError(f"{where}: not a usable {example}: {what}; fix or remove the line", reason, where)


def sft_options(item: str) -> dict[str, Any]:
    """Keyword arguments of ``stdlib_sft`` from ``stdlib:sft?seed=1&per_definition=2``."""
    return query_options(item, _SFT_OPTIONS)


def _stdlib_dialogs(item: str, on_bad_input: OnBadInput) -> Iterator[Dialog]:
    from herd.data.embedded.sft import stdlib_sft

    for dialog in stdlib_sft(**sft_options(item)):
        try:
            yield Dialog(dialog.id, checked_messages(dialog.messages, dialog.id), dialog.group)
        except BadInputError as err:
            on_bad_input(err)


def _transcript_dialogs(item: str) -> Iterator[Dialog]:
    from herd.data.embedded.speech import speech_options, transcript_dialogs

    try:
        options = speech_options(item)
    except ValueError as err:
        raise PrepareError(str(err)) from None
    for dialog_id, messages in transcript_dialogs(**options):
        yield Dialog(dialog_id, messages)


# --- encoding -----------------------------------------------------------------------------------


def dialog_encoder(tokenizer: Tokenizer, chat_template: str = "auto") -> Callable[[Dialog], EncodedDialog]:
    """The encoder of ``chat_template`` (see the module docstring): ids and the assistant's mask.

    A format that cannot be used (no template, a missing .jinja file) is a PrepareError; a dialog
    the format cannot encode is a bad input with reason ``template_error``.
    """
    try:
        fmt = chat_format(tokenizer, chat_template)
    except ChatFormatError as err:
        raise PrepareError(f"chat_template: {err}") from None

    def encode(dialog: Dialog) -> EncodedDialog:
        try:
            encoded = fmt.encode(dialog.messages)
        except ChatTemplateError as err:
            raise PrepareError(f"chat_template={chat_template}: {err}") from None
        except ChatFormatError as err:
            raise BadInputError(f"{dialog.id}: {err}; fix or remove the dialog", "template_error", dialog.id) from None
        return EncodedDialog(np.asarray(encoded.ids, np.uint32), np.asarray(encoded.role_mask, bool))

    return encode


# --- the kind -----------------------------------------------------------------------------------


class DialogKind:
    """Dialogs packed whole with a loss mask; see the module docstring."""

    name = "dialog"
    options: Mapping[str, Any] = {"glob": "**/*.jsonl", "chat_template": "auto", "too_long": "drop"}
    on_bad_input = "skip"
    max_bad_fraction = 0.1

    def check(self, spec: SourceSpec) -> None:
        """Refuse an unknown chat_template (not a name nor a .jinja path) or too_long."""
        template = str(spec.options["chat_template"])
        if template not in CHAT_TEMPLATES and not template.endswith(".jinja"):
            raise PrepareError(f"sources.{spec.name}.chat_template must be one of {CHAT_TEMPLATES} or the path of a "
                               f".jinja file, got {template!r}")
        for key, allowed in (("too_long", TOO_LONG),):
            if spec.options[key] not in allowed:
                raise PrepareError(
                    f"sources.{spec.name}.{key} must be one of {allowed}, got {spec.options[key]!r}"
                )

    def dialogs(self, spec: SourceSpec, on_bad_input: OnBadInput) -> Iterator[Dialog]:
        """The source's dialogs in order; bad lines go to ``on_bad_input``."""
        return iter_dialogs(spec.inputs, str(spec.options["glob"]), on_bad_input)

    def texts(self, spec: SourceSpec, val_fraction: float, on_bad_input: BadInputs) -> Iterator[str]:
        """The message contents of every train dialog."""
        for dialog in self.dialogs(spec, on_bad_input):
            if assign_split(dialog.split_key, val_fraction) == "train":
                yield from (message["content"] for message in dialog.messages)

    def prepare(self, spec: SourceSpec, job: Job, bad_inputs: BadInputs) -> dict[str, Any]:
        """Encode the dialogs, pack them whole into rows per split, and write the shards."""
        encode = dialog_encoder(job.tokenizer, spec.options["chat_template"])
        truncate = spec.options["too_long"] == "truncate"
        buffers = job.buffers(spec.name, loss_mask=True)
        packers: dict[str, WholePacker] = {split: WholePacker(job.row_len, _OPEN_ROWS) for split in SPLITS}
        too_long = {"policy": spec.options["too_long"], "dropped": 0, "truncated": 0}
        groups: dict[str, set[str]] = {split: set() for split in SPLITS}
        read = kept = 0
        task = job.progress.add_task(f"encode {spec.name}", total=None)
        for dialog in self.dialogs(spec, bad_inputs):
            try:
                encoded = encode(dialog)
            except BadInputError as err:
                bad_inputs(err)
                continue
            read += 1
            if len(encoded.ids) > job.row_len:
                encoded = _cut(encoded, job.row_len) if truncate else None
                too_long["truncated" if encoded is not None else "dropped"] += 1
                if encoded is None:
                    continue
            split = assign_split(dialog.split_key, job.val_fraction)
            if dialog.group is not None:
                groups[split].add(dialog.group)
            for row in packers[split].add((kept, encoded), len(encoded.ids)):
                _write_row(buffers[split], row, job)
            kept += 1
            if kept % 1000 == 0:
                job.progress.update(task, description=f"encode {spec.name}: {kept:,} dialogs")
        for split in SPLITS:
            for row in packers[split].finish():
                _write_row(buffers[split], row, job)
            buffers[split].close()
        bad_inputs.check(read, f"check sources.{spec.name}.input (jsonl lines of 'messages', or 'prompt' and "
                               "'completion') and glob")  # fmt: skip
        if read == 0:
            raise PrepareError(
                f"source {spec.name}: its inputs hold no dialogs; check sources.{spec.name}.input"
            )
        if kept == 0:
            raise PrepareError(
                f"source {spec.name}: all {read} dialogs are longer than a row of seq_len + 1 = {job.row_len} "
                f"tokens; raise seq_len, or set sources.{spec.name}.too_long=truncate"
            )
        splits = {split: job.write(spec.name, split, buffers[split]) for split in SPLITS}
        entry = source_entry(self.name, spec, splits, bad_inputs, chat_template=spec.options["chat_template"],
                             documents=kept, too_long=too_long)
        if any(groups.values()):
            entry["groups"] = {split: len(names) for split, names in groups.items()}
        return entry

    def summary(self, name: str, entry: Mapping[str, Any]) -> str:
        """``name: N dialogs, T tokens (A trained); too long: ...; train R rows ..., val ...``."""
        long = entry["too_long"]
        return (
            f"{name}: {entry['documents']} dialogs, {entry['tokens']} tokens ({entry['trained_tokens']} trained); "
            f"too long: {long['dropped']} dropped, {long['truncated']} truncated; {splits_summary(entry)}"
        )


def _cut(encoded: EncodedDialog, length: int) -> EncodedDialog | None:
    """The first ``length`` tokens, or None when no assistant token is left."""
    mask = encoded.loss_mask[:length]
    return EncodedDialog(encoded.ids[:length], mask) if mask.any() else None


def _write_row(buffer, row: list[tuple[int, EncodedDialog]], job: Job) -> None:
    """Append one packed row to a split buffer: its dialogs, then padding up to row_len."""
    used = 0
    for document_id, encoded in row:
        buffer.append(encoded.ids, document_id, encoded.loss_mask)
        used += len(encoded.ids)
    if used < job.row_len:
        buffer.append(np.full(job.row_len - used, job.tokenizer.eos_id, np.uint32), -1)


DIALOG = DialogKind()
