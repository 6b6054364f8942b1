"""Preference sources for ``herd.prepare``: ranked responses to a prompt, one ranking per row span.

A source with ``kind: preference`` (and every source whose input is the embedded
``stdlib:preferences``) holds rankings: a prompt and two or more responses, each with a rank
(0 is best; equal ranks are ties and form no pair). Its inputs are:

- jsonl files (or folders of them: the files matching the source's ``glob``, default
  ``**/*.jsonl``), one ranking per line, in any of these layouts::

      {"prompt": [messages] or "a user message",
       "responses": [{"content": "...", "rank": 0}, {"content": "...", "rank": 1}, ...]}
      {"prompt": [messages] or "a user message",
       "chosen": "an answer" or [one assistant message], "rejected": the same}
      {"chosen": [messages], "rejected": [messages]}

  The second and third are TRL's preference layouts, read as ``chosen`` rank 0 and
  ``rejected`` rank 1. In the third (TRL's implicit prompt) the longest run of first messages
  that ``chosen`` and ``rejected`` share is the prompt, and each must have exactly one
  assistant message after it. A response is one assistant message: a string, or a
  ``{"content": ...}`` object (``role``, if given, must be ``assistant``; ``python_tag`` and
  ``eom`` as in :mod:`herd.data.chat`). A line may name its ``id`` (a string; default
  ``file:line``) and its ``group`` (a string: the split is then assigned by hashing the group,
  so a group is held out whole).
- ``stdlib:preferences``: three ranked answers to each ``stdlib:sft`` question
  (:mod:`herd.data.embedded.preferences`), grouped by module. Options go in a query string:
  ``stdlib:preferences?seed=1&max_per_module=20&system=You+are+terse.``

A line that is not a usable ranking is a :class:`~herd.data.inputs.BadInputError` naming
``file:line``, with a reason of :data:`BAD_INPUT_REASONS`; preference sources skip and count
them by default (``on_bad_input``), and fail when more than ``max_bad_fraction`` (0.1) of a
source's lines are bad.

Encoding: the source's chat format (``chat_template``, as for dialogs: see
:func:`herd.data.chat.chat_format`; Llama 3's format by default for tokenizers that have its
tokens). A ranking is laid out as ``[prompt][response 1][response 2]...``, the prompt encoded once:

- the prompt is the encoding of the prompt's turns (``<|begin_of_text|>`` and the turns);
- each response is what encoding ``prompt + [response]`` adds after the prompt, through the
  response's end-of-turn token (``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` +
  content + ``<|eot_id|>`` in Llama 3's format), less trailing padding ids: the ids
  :meth:`herd.data.chat.ChatFormat.response_ids` gives, whose last token is where the reward model
  reads, in training as when scoring;
- the responses are shuffled into a fixed order seeded by the ranking's id;
- per-token members: ``loss_mask`` is true on each response's content (its assistant
  ``role_mask`` less the ``format_mask``: no header, no ``<|eot_id|>``); ``response_ids`` is 0
  on the prompt and k = 1..K on the tokens of the k-th response in the row; ``ranks`` is the
  rank of the response a token belongs to, -1 on the prompt. Padding has loss mask 0,
  response id 0 and rank -1.

Packing: rankings are packed whole, several to a row, first-fit
(:class:`herd.data.packing.WholePacker`), each with its own document id, into the first
``seq_len`` tokens of each row of ``seq_len + 1``: every token of a ranking, each response's
closing ``<|eot_id|>`` included, is an input position of the training sample (``row[:-1]``),
and the row's last token is always padding. A ranking longer than ``seq_len`` tokens is
dropped and counted (``too_long``), never truncated. Rows use the ``preference`` layout of
``herd.data.shards.LAYOUTS`` and are read at the stored seq_len; the batches they give are
described in :mod:`herd.data.loaders.packed`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.data.chat import CHAT_TEMPLATES, ChatFormat, ChatFormatError, ChatTemplateError, chat_format
from herd.data.embedded.preferences import STDLIB_PREFERENCES
from herd.data.inputs import (
    BadInputError,
    OnBadInput,
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
    SplitBuffer,
    assign_split,
    source_entry,
    splits_summary,
)
from herd.data.kinds.dialog import checked_messages
from herd.data.packing import EXTRA_MEMBERS, WholePacker
from herd.data.shards import SPLITS

if TYPE_CHECKING:
    pass

# Why a line is not a usable ranking (BadInputError.reason); the first five are shared with text.
BAD_INPUT_REASONS = (
    "not_utf8", "malformed_json", "not_an_object", "binary", "too_long_line",
    "no_prompt", "no_responses", "too_few_responses", "too_many_responses",
    "bad_message", "unknown_role", "empty_content", "bad_rank", "no_pairs", "identical_responses",
)  # fmt: skip
EXTRAS = ("response_ids", "ranks")  # the layout's members beyond tokens, document ids and loss mask
# Response ids and ranks are stored as int16.
MAX_RESPONSES = MAX_RANK = int(np.iinfo(EXTRA_MEMBERS["response_ids"].dtype).max)
_SET_OPTIONS = {"seed": int, "max_per_module": int, "system": str}
_OPEN_ROWS = 16  # rows the first-fit packer keeps open
_EXAMPLE = "preference ranking"


@dataclass(frozen=True)
class Response:
    """One response: an assistant message (role, content, optional chat flags) and its rank (0 = best)."""

    message: dict[str, Any]
    rank: int


@dataclass(frozen=True)
class Ranking:
    """A prompt (messages) and its ranked responses, in input order; a stable id and optional group."""

    id: str
    prompt: list[dict[str, Any]]
    responses: list[Response]
    group: str | None = None

    @property
    def split_key(self) -> str:
        """What the split is assigned by: the group when there is one, else the id."""
        return self.group if self.group is not None else self.id

    @property
    def pairs(self) -> int:
        """Pairs of responses with different ranks: what a reward model or DPO learns from."""
        ranks = [response.rank for response in self.responses]
        return sum(a != b for i, a in enumerate(ranks) for b in ranks[i + 1 :])


@dataclass(frozen=True)
class EncodedRanking:
    """A ranking laid out as ``[prompt][response 1][response 2]...`` (see the module docstring).

    ``ids`` uint32, ``loss_mask`` bool, ``response_ids`` and ``ranks`` int16, all of one length.
    """

    ids: np.ndarray
    loss_mask: np.ndarray
    response_ids: np.ndarray
    ranks: np.ndarray

    @property
    def extras(self) -> dict[str, np.ndarray]:
        """The row members beyond tokens and loss mask, by name."""
        return {"response_ids": self.response_ids, "ranks": self.ranks}


# --- reading ------------------------------------------------------------------------------------


def iter_rankings(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    glob: str = "**/*.jsonl",
    on_bad_input: OnBadInput = raise_bad_input,
) -> Iterator[Ranking]:
    """Rankings of one source's inputs, in order: jsonl files, folders of them, ``stdlib:preferences``.

    A line that is not a usable ranking goes to ``on_bad_input`` (which raises by default); if it
    returns, the line is skipped. Missing inputs raise FileNotFoundError.
    """
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        item = str(item)
        if item == STDLIB_PREFERENCES or item.startswith(STDLIB_PREFERENCES + "?"):
            yield from _stdlib_rankings(item, on_bad_input)
            continue
        for file, file_id in jsonl_files(item, glob, f"{STDLIB_PREFERENCES!r} for the embedded rankings"):
            yield from jsonl_rankings(file, file_id, on_bad_input)


def jsonl_rankings(
    path: Path, file_id: str | None = None, on_bad_input: OnBadInput = raise_bad_input
) -> Iterator[Ranking]:
    """One ranking per non-blank line of a jsonl file (id ``file_id:line``); bad lines named ``file:line``."""
    file_id = file_id or path.name
    expected = "'prompt' and 'responses' (or 'chosen' and 'rejected')"
    for line_number, record in jsonl_records(path, on_bad_input, expected):
        try:
            yield record_ranking(record, f"{path}:{line_number}", f"{file_id}:{line_number}")
        except BadInputError as err:
            on_bad_input(err)


def record_ranking(record: Mapping[str, Any], where: str, ranking_id: str) -> Ranking:
    """The ranking of one jsonl object in any layout of the module docstring, checked.

    ``ranking_id`` is used unless the line names its own ``id``. Raises BadInputError located at
    ``where`` for anything that is not a usable ranking.
    """
    if "responses" in record:
        prompt = _prompt(record, where)
        responses = _ranked(record["responses"], where)
    elif "chosen" in record or "rejected" in record:
        missing = [key for key in ("chosen", "rejected") if key not in record]
        if missing:
            raise _bad(
                where, "too_few_responses", f"a chosen/rejected line needs both, {missing[0]!r} is missing"
            )
        if "prompt" in record:
            prompt = _prompt(record, where)
            chosen, rejected = (_response(record[key], where, key) for key in ("chosen", "rejected"))
        else:
            prompt, chosen, rejected = _implicit_prompt(record["chosen"], record["rejected"], where)
        responses = [Response(chosen, 0), Response(rejected, 1)]
    else:
        raise _bad(
            where,
            "no_responses",
            f"no 'responses' (or 'chosen' and 'rejected') field (fields: {sorted(record)})",
        )
    if len({response.rank for response in responses}) == 1:
        raise _bad(where, "no_pairs", f"every response has rank {responses[0].rank}: ties form no pair")
    _check_distinct(responses, where)
    ranking_id = _name(record, "id", where) or ranking_id
    return Ranking(ranking_id, prompt, responses, _name(record, "group", where))


def _check_distinct(responses: Sequence[Response], where: str) -> None:
    """Refuse two responses of different ranks with the same message (content compared after strip):
    the pair would teach the model to prefer a text over itself."""
    seen: dict[tuple[Any, ...], Response] = {}
    for index, response in enumerate(responses):
        message = response.message
        key = (message["content"].strip(), *((flag, message[flag]) for flag in sorted(message) if flag not in
                                              ("role", "content")))
        first = seen.setdefault(key, response)
        if first.rank != response.rank:
            raise _bad(where, "identical_responses", f"response {index} (rank {response.rank}) is the same text as "
                       f"response {responses.index(first)} (rank {first.rank}): a pair needs two different answers")


def _prompt(record: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The line's ``prompt`` as checked messages: a string is one user message."""
    if "prompt" not in record:
        raise _bad(where, "no_prompt", f"no 'prompt' field (fields: {sorted(record)})")
    value = record["prompt"]
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad(
            where,
            "bad_message",
            f"'prompt' must be a string or a list of messages, got {type(value).__name__}",
        )
    if not value:
        raise _bad(where, "no_prompt", "'prompt' is an empty list")
    return checked_messages(value, where, need_assistant=False, example=f"{_EXAMPLE} ('prompt')")


def _ranked(value: Any, where: str) -> list[Response]:
    """The ``responses`` of the ranking layout: objects with a ``content`` and an integer ``rank``."""
    if not isinstance(value, list):
        raise _bad(where, "bad_message", f"'responses' must be a list, got {type(value).__name__}")
    if len(value) < 2:
        raise _bad(where, "too_few_responses", f"{len(value)} response(s): a ranking needs at least 2")
    if len(value) > MAX_RESPONSES:
        raise _bad(where, "too_many_responses", f"{len(value)} responses: a ranking may have {MAX_RESPONSES}")
    responses = []
    for index, item in enumerate(value):
        key = f"response {index}"
        if not isinstance(item, Mapping):
            raise _bad(
                where, "bad_message", f"{key} is a {type(item).__name__}, not a {{content, rank}} object"
            )
        rank = item.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= MAX_RANK:
            raise _bad(
                where,
                "bad_rank",
                f"{key}: 'rank' must be an integer from 0 (best) to {MAX_RANK}, got {rank!r}",
            )
        message = {name: item[name] for name in ("role", "content", "python_tag", "eom") if name in item}
        responses.append(Response(_assistant({"role": "assistant", **message}, where, key), rank))
    return responses


def _response(value: Any, where: str, key: str) -> dict[str, Any]:
    """A TRL ``chosen``/``rejected`` beside a prompt: a string, or a list of one assistant message."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or len(value) != 1:
        got = f"{len(value)} messages" if isinstance(value, list) else f"a {type(value).__name__}"
        raise _bad(
            where,
            "bad_message",
            f"{key!r} must be one assistant message (a string, or a list of one message), got {got}",
        )
    return _assistant(value[0], where, repr(key))


def _implicit_prompt(
    chosen: Any, rejected: Any, where: str
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(prompt, chosen, rejected) of two whole dialogs: the prompt is their longest common start."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise _bad(
            where,
            "no_prompt",
            "no 'prompt' field: without one, 'chosen' and 'rejected' must be whole dialogs (lists of "
            "messages) that start with the same prompt",
        )
    dialogs = [
        checked_messages(value, where, need_assistant=False, example=f"{_EXAMPLE} ({key!r})")
        for key, value in (("chosen", chosen), ("rejected", rejected))
    ]
    shared = 0
    while shared < min(map(len, dialogs)) and dialogs[0][shared] == dialogs[1][shared]:
        shared += 1
    if shared == 0:
        raise _bad(
            where,
            "no_prompt",
            "no 'prompt' field, and 'chosen' and 'rejected' share no first message to take as the prompt",
        )
    for key, dialog in zip(("chosen", "rejected"), dialogs, strict=True):
        rest = dialog[shared:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = [message["role"] for message in rest]
            raise _bad(
                where,
                "bad_message",
                f"the prompt is the {shared} first messages 'chosen' and 'rejected' share; after them "
                f"{key!r} must have exactly one assistant message, it has {roles}",
            )
    return dialogs[0][:shared], dialogs[0][shared], dialogs[1][shared]


def _assistant(message: Any, where: str, key: str) -> dict[str, Any]:
    """One checked message that must be the assistant's."""
    (checked,) = checked_messages([message], where, need_assistant=False, example=f"{_EXAMPLE} ({key})")
    if checked["role"] != "assistant":
        raise _bad(
            where, "bad_message", f"{key}: a response is an assistant message, got role {checked['role']!r}"
        )
    return checked


def _name(record: Mapping[str, Any], key: str, where: str) -> str | None:
    """An optional non-empty string field (``id``, ``group``)."""
    value = record.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise _bad(where, "bad_message", f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _bad(where: str, reason: str, what: str) -> BadInputError:
    return BadInputError(f"{where}: not a usable {_EXAMPLE}: {what}; fix or remove the line", reason, where)


def preference_options(item: str) -> dict[str, Any]:
    """Keyword arguments of ``stdlib_preferences`` from ``stdlib:preferences?seed=1&max_per_module=20``."""
    return query_options(item, _SET_OPTIONS)


def _stdlib_rankings(item: str, on_bad_input: OnBadInput) -> Iterator[Ranking]:
    from herd.data.embedded.preferences import stdlib_preferences

    for example in stdlib_preferences(**preference_options(item)):
        try:
            yield record_ranking(example.record(), example.id, example.id)
        except BadInputError as err:
            on_bad_input(err)


# --- encoding -----------------------------------------------------------------------------------


def response_order(ranking: Ranking) -> list[int]:
    """Indices of ``ranking.responses`` in their row order: shuffled, seeded by the ranking's id."""
    order = list(range(len(ranking.responses)))
    random.Random(f"herd.preferences:{ranking.id}").shuffle(order)
    return order


def encode_ranking(fmt: ChatFormat, ranking: Ranking) -> EncodedRanking:
    """The ranking's row span ``[prompt][response 1][response 2]...`` (see the module docstring).

    Raises :class:`~herd.data.chat.ChatFormatError` when the format cannot encode it.
    """
    prompt = fmt.encode(ranking.prompt).ids
    n = len(prompt)
    ids = [np.asarray(prompt, np.uint32)]
    masks = [np.zeros(n, bool)]
    response_ids = [np.zeros(n, np.int16)]
    ranks = [np.full(n, -1, np.int16)]
    for k, index in enumerate(response_order(ranking), start=1):
        response = ranking.responses[index]
        messages = [*ranking.prompt, response.message]
        dialog = fmt.encode(messages)
        if dialog.ids[:n] != prompt:
            raise ChatFormatError("encoding the prompt with a response changed the prompt's ids (the chat template "
                                  "renders the prompt differently when an answer follows it)")
        end = fmt.scored_length(dialog)  # where the reward model reads, as it does when scoring
        piece = np.asarray(dialog.ids[n:end], np.uint32)
        ids.append(piece)
        masks.append(np.asarray(dialog.role_mask[n:end], bool) & ~np.asarray(dialog.format_mask[n:end], bool))
        response_ids.append(np.full(len(piece), k, np.int16))
        ranks.append(np.full(len(piece), response.rank, np.int16))
    return EncodedRanking(*(np.concatenate(parts) for parts in (ids, masks, response_ids, ranks)))


# --- the kind -----------------------------------------------------------------------------------


class PreferenceKind:
    """Ranked responses sharing a prompt, packed whole; see the module docstring."""

    name = "preference"
    options: Mapping[str, Any] = {"glob": "**/*.jsonl", "chat_template": "auto"}
    on_bad_input = "skip"
    max_bad_fraction = 0.1

    def check(self, spec: SourceSpec) -> None:
        """Refuse a chat_template that is not a name nor a .jinja path (glob is free-form)."""
        template = str(spec.options["chat_template"])
        if template not in CHAT_TEMPLATES and not template.endswith(".jinja"):
            raise PrepareError(f"sources.{spec.name}.chat_template must be one of {CHAT_TEMPLATES} or the path of a "
                               f".jinja file, got {template!r}")

    def rankings(self, spec: SourceSpec, on_bad_input: OnBadInput) -> Iterator[Ranking]:
        """The source's rankings in order; bad lines go to ``on_bad_input``."""
        return iter_rankings(spec.inputs, str(spec.options["glob"]), on_bad_input)

    def texts(self, spec: SourceSpec, val_fraction: float, on_bad_input: BadInputs) -> Iterator[str]:
        """The prompt and response contents of every train ranking."""
        for ranking in self.rankings(spec, on_bad_input):
            if assign_split(ranking.split_key, val_fraction) == "train":
                yield from (message["content"] for message in ranking.prompt)
                yield from (response.message["content"] for response in ranking.responses)

    def prepare(self, spec: SourceSpec, job: Job, bad_inputs: BadInputs) -> dict[str, Any]:
        """Encode the rankings, pack them whole into rows per split, and write the shards."""
        buffers = job.buffers(spec.name, loss_mask=True, extras=EXTRAS)
        packers = {split: WholePacker(job.seq_len, _OPEN_ROWS) for split in SPLITS}
        counts = {split: {"responses": 0, "pairs": 0} for split in SPLITS}
        groups: dict[str, set[str]] = {split: set() for split in SPLITS}
        read = kept = too_long = 0
        try:
            fmt = chat_format(job.tokenizer, str(spec.options["chat_template"]))
        except ChatFormatError as err:
            raise PrepareError(f"sources.{spec.name}.chat_template: {err}") from None
        task = job.progress.add_task(f"encode {spec.name}", total=None)
        for ranking in self.rankings(spec, bad_inputs):
            read += 1
            try:
                encoded = encode_ranking(fmt, ranking)
            except ChatTemplateError as err:
                raise PrepareError(f"sources.{spec.name}.chat_template: {err}") from None
            except ChatFormatError as err:
                bad_inputs(BadInputError(f"{ranking.id}: {err}; fix or remove the line", "template_error", ranking.id))
                continue
            if len(encoded.ids) > job.seq_len:
                too_long += 1
                continue
            split = assign_split(ranking.split_key, job.val_fraction)
            if ranking.group is not None:
                groups[split].add(ranking.group)
            counts[split]["responses"] += len(ranking.responses)
            counts[split]["pairs"] += ranking.pairs
            for row in packers[split].add((kept, encoded), len(encoded.ids)):
                _write_row(buffers[split], row, job)
            kept += 1
            if kept % 1000 == 0:
                job.progress.update(task, description=f"encode {spec.name}: {kept:,} rankings")
        for split in SPLITS:
            for row in packers[split].finish():
                _write_row(buffers[split], row, job)
            buffers[split].close()
        bad_inputs.check(
            read,
            f"check sources.{spec.name}.input (jsonl lines of 'prompt' and 'responses', "
            "or 'chosen' and 'rejected') and glob",
        )
        if read == 0:
            raise PrepareError(
                f"source {spec.name}: its inputs hold no rankings; check sources.{spec.name}.input"
            )
        if kept == 0:
            raise PrepareError(
                f"source {spec.name}: all {read} rankings (prompt and every response) are longer than "
                f"seq_len = {job.seq_len} tokens; raise seq_len"
            )
        splits = {split: {**job.write(spec.name, split, buffers[split]), **counts[split]} for split in SPLITS}
        entry = source_entry(self.name, spec, splits, bad_inputs, chat_template=spec.options["chat_template"],
                             chat_format=fmt.name, examples=kept, too_long=too_long,
                             responses=sum(s["responses"] for s in splits.values()),
                             pairs=sum(s["pairs"] for s in splits.values()))
        if any(groups.values()):
            entry["groups"] = {split: len(names) for split, names in groups.items()}
        return entry

    def summary(self, name: str, entry: Mapping[str, Any]) -> str:
        """``name: N rankings (R responses, P pairs), T tokens (A trained); D too long; train/val rows``."""
        return (
            f"{name}: {entry['examples']} rankings ({entry['responses']} responses, {entry['pairs']} pairs), "
            f"{entry['tokens']} tokens ({entry['trained_tokens']} trained); {entry['too_long']} too long, "
            f"dropped; {splits_summary(entry)}"
        )


def _write_row(buffer: SplitBuffer, row: list[tuple[int, EncodedRanking]], job: Job) -> None:
    """Append one packed row to a split buffer: its rankings, then padding up to row_len."""
    used = 0
    for document_id, encoded in row:
        buffer.append(encoded.ids, document_id, encoded.loss_mask, encoded.extras)
        used += len(encoded.ids)
    buffer.append(np.full(job.row_len - used, job.tokenizer.eos_id, np.uint32), -1)


PREFERENCE = PreferenceKind()
