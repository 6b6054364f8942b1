"""What every media-with-text kind of ``herd.prepare`` shares: inputs, checks, shards (images, audio).

A media kind (``kind: image``, ``kind: audio``) pairs one media file with one text: an image
and its caption, a clip and its transcript. :class:`MediaFields` names the two parts; the kind
module (``herd.data.kinds.image``, ``herd.data.kinds.audio``) subclasses :class:`MediaKind` with how to
decode, check and store its media and how to encode its text. What this module does for all:

- inputs (:meth:`MediaKind.examples`): a folder of media files, each with its text in the
  ``.txt`` file of the same name beside it (the id is the path relative to the folder); a jsonl
  of ``{"<media>": "path", "<text>": "..."}`` with optional ``"prompt"``, ``"id"`` and
  ``"group"`` (a relative path is taken from the jsonl's folder; the default id is
  ``file:line``); or the kind's embedded ``stdlib:`` set;
- bad inputs as :class:`~herd.data.inputs.BadInputError` naming them, with the reasons of
  :func:`bad_input_reasons` (``missing_<media>``, ``unreadable_<media>``, ``corrupt_<media>``,
  ``no_<text>``, ``empty_<text>``, ``bad_field`` and the jsonl ones);
- the prepare loop (:meth:`MediaKind.prepare`): media are loaded and decoded in the Job's worker
  processes (in input order), spooled to disk, and written one example per WebDataset sample;
- shards (:func:`write_example_split`, :func:`read_example_shard`): ``<key>.tokens.npy``
  (unsigned ids), ``<key>.loss_mask.npy`` (uint8), ``<key>.<media>.<suffix>`` (the stored media
  file) and ``<key>.json`` (id, prompt and text), checked on read.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.data.inputs import BadInputError, OnBadInput, folder_files, jsonl_records
from herd.data.kinds import (
    BadInputs,
    Job,
    PrepareError,
    SourceSpec,
    assign_split,
    source_entry,
    splits_summary,
)
from herd.data.shards import (
    SPLITS,
    ShardError,
    ShardInfo,
    load_npy,
    read_samples,
    tar_bytes,
    tar_member,
    token_dtype,
    write_atomic,
)

if TYPE_CHECKING:
    from herd.data.tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class MediaFields:
    """How a media kind names its parts (jsonl fields, shard members, reasons, messages)."""

    media: str  # "image": the jsonl field and the shard member
    text: str  # "caption": the jsonl field and the json member's key
    suffixes: tuple[str, ...]  # media file suffixes a folder input takes
    files: str  # "images": the media files in messages
    embedded: str  # "stdlib:shapes": the embedded input


def bad_input_reasons(fields: MediaFields) -> tuple[str, ...]:
    """The BadInputError reasons of a media kind."""
    media, text = fields.media, fields.text
    return ("not_utf8", "malformed_json", "not_an_object", "too_long_line", f"missing_{media}", f"unreadable_{media}",
            f"corrupt_{media}", f"no_{text}", f"empty_{text}", "bad_field")


# --- examples -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaExample:
    """One media file and its text, before decoding: ``read()`` returns the media file's bytes.

    ``read`` is picklable (a module-level function or a partial of one), so that worker processes
    can load the example.
    """

    id: str
    text: str
    read: Callable[[], bytes]
    prompt: str | None = None
    group: str | None = None

    @property
    def split_key(self) -> str:
        """What the split is assigned by: the group when there is one, else the id."""
        return self.group if self.group is not None else self.id


def given(data: bytes) -> Callable[[], bytes]:
    """A picklable ``read`` that returns ``data`` (media made in memory)."""
    return functools.partial(_same, data)


def _same(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Loaded:
    """A checked media file as it is stored: its bytes, file suffix and numbers to sum per split."""

    data: bytes
    suffix: str
    stats: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Encoded:
    """A checked example, its media bytes spooled to disk at ``offset`` (``size`` bytes)."""

    description: dict[str, str]
    ids: np.ndarray
    loss_mask: np.ndarray
    member: str
    offset: int
    size: int
    stats: Mapping[str, float]


# --- the kind -------------------------------------------------------------------------------------


class MediaKind:
    """Media files with texts, one example per sample; a kind module fills in the hooks below."""

    name: str
    fields: MediaFields
    options: Mapping[str, Any] = {"glob": "**/*", "prompt": ""}
    on_bad_input = "skip"
    max_bad_fraction = 0.1

    # --- hooks

    def embedded(self, item: str) -> Iterator[MediaExample]:
        """The examples of the kind's embedded input ``item`` (``fields.embedded`` with options)."""
        raise NotImplementedError

    def load(self, example: MediaExample, options: Mapping[str, Any]) -> Loaded:
        """Read, decode and check one example's media (in a worker); BadInputError when unusable."""
        raise NotImplementedError

    def encode(self, tokenizer: Tokenizer, prompt: str, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, loss_mask)`` of one example."""
        raise NotImplementedError

    def token_ids(self, tokenizer: Tokenizer) -> dict[str, int]:
        """Ids the kind adds to the manifest entry (``image_token_id``, ...); the largest bounds the dtype."""
        return {}

    def too_long(self, loaded: Loaded, options: Mapping[str, Any]) -> bool:
        """True when the media is longer than the source allows (dropped and counted as too long)."""
        return False

    # --- shared

    def check(self, spec: SourceSpec) -> None:
        """``prompt`` must be a string."""
        if not isinstance(spec.options["prompt"], str):
            raise PrepareError(f"sources.{spec.name}.prompt must be a string, got {spec.options['prompt']!r}")

    def examples(self, inputs: list[str], glob: str, on_bad_input: OnBadInput) -> Iterator[MediaExample]:
        """The examples of a source's inputs in order; bad texts and jsonl lines go to ``on_bad_input``."""
        fields = self.fields
        for item in inputs:
            if item == fields.embedded or item.startswith(fields.embedded + "?"):
                yield from self.embedded(item)
                continue
            path = Path(item).expanduser()
            if path.is_dir():
                yield from self._folder_examples(path, glob, on_bad_input)
            elif path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
                yield from self._jsonl_examples(path, on_bad_input)
            elif path.is_file():
                raise PrepareError(f"{fields.media} input {path} is neither a folder of {fields.files} with .txt "
                                   f"{fields.text}s nor a .jsonl file")
            else:
                raise FileNotFoundError(f"input not found: {path}. Give a folder of {fields.files} with .txt "
                                        f"{fields.text}s, a .jsonl of {fields.media} paths and {fields.text}s, or "
                                        f"{fields.embedded!r}")

    def texts(self, spec: SourceSpec, val_fraction: float, on_bad_input: BadInputs) -> Iterator[str]:
        """The texts (and prompts) of the train examples, to train a tokenizer on."""
        for example in self.examples(spec.inputs, str(spec.options["glob"]), on_bad_input):
            if assign_split(example.split_key, val_fraction) == "train":
                yield example.text
                if example.prompt or spec.options["prompt"]:
                    yield example.prompt or spec.options["prompt"]

    def prepare(self, spec: SourceSpec, job: Job, bad_inputs: BadInputs) -> dict[str, Any]:
        """Check, encode and spool every example (media loaded in the workers), then write each split."""
        fields, options = self.fields, spec.options
        token_ids = self.token_ids(job.tokenizer)
        encoded: dict[str, list[_Encoded]] = {split: [] for split in SPLITS}
        spools = {split: open(job.scratch / f"{spec.name}.{split}.media", "w+b") for split in SPLITS}  # noqa: SIM115
        read = too_long = 0
        task = job.progress.add_task(f"encode {spec.name}", total=None)
        examples = self.examples(spec.inputs, str(options["glob"]), bad_inputs)
        try:
            for example, loaded in job.pool.imap(_load, ((self, example, options) for example in examples)):
                read += 1
                if isinstance(loaded, tuple):  # a BadInputError's (message, reason, location)
                    bad_inputs(BadInputError(*loaded))
                    read -= 1  # counted as a bad input, not as an example read
                    continue
                prompt = example.prompt if example.prompt is not None else str(options["prompt"])
                ids, mask = self.encode(job.tokenizer, prompt, example.text)
                if len(ids) > job.seq_len or self.too_long(loaded, options):
                    too_long += 1
                    continue
                split = assign_split(example.split_key, job.val_fraction)
                spool = spools[split]
                offset = spool.seek(0, os.SEEK_END)
                spool.write(loaded.data)
                description = {"id": example.id, "prompt": prompt, fields.text: example.text}
                encoded[split].append(_Encoded(description, ids, mask, f"{fields.media}.{loaded.suffix}", offset,
                                               len(loaded.data), loaded.stats))
                if read % 1000 == 0:
                    job.progress.update(task, description=f"encode {spec.name}: {read:,} {fields.files}")
            bad_inputs.check(read, f"check sources.{spec.name}.input ({fields.files} with .txt {fields.text}s, or "
                                   f"jsonl lines of '{fields.media}' and '{fields.text}')")
            kept = sum(len(examples) for examples in encoded.values())
            if kept == 0:
                raise PrepareError(f"source {spec.name}: no example fits seq_len = {job.seq_len} tokens "
                                   f"({too_long} too long); raise seq_len")
            dtype = token_dtype(max(job.tokenizer.vocab_size, *(i + 1 for i in token_ids.values())))
            splits = {split: write_example_split(job.out, f"{spec.name}/{split}", encoded[split], spools[split],
                                                 dtype, job.max_rows, job.min_count) for split in SPLITS}
        finally:
            for spool in spools.values():
                spool.close()
        return source_entry(self.name, spec, splits, bad_inputs, **token_ids, examples=kept, too_long=too_long)

    def summary(self, name: str, entry: Mapping[str, Any]) -> str:
        """``name: N <files> with <text>s, T tokens (A trained); D too long; train/val examples``."""
        return (f"{name}: {entry['examples']} {self.fields.files} with {self.fields.text}s, {entry['tokens']} "
                f"tokens ({entry['trained_tokens']} trained); {entry['too_long']} too long, dropped; "
                f"{splits_summary(entry, 'examples')}")

    # --- inputs

    def _folder_examples(self, folder: Path, glob: str, on_bad_input: OnBadInput) -> Iterator[MediaExample]:
        fields = self.fields
        files = [p for p in folder_files(folder, glob) if p.suffix.lower() in fields.suffixes]
        if not files:
            raise FileNotFoundError(f"no {fields.files} ({', '.join(fields.suffixes)}) match {glob!r} in {folder}")
        for file in files:
            key = str(file.relative_to(folder))
            text_file = file.with_suffix(".txt")
            try:
                if not text_file.is_file():
                    raise BadInputError(f"{file}: no {fields.text} file {text_file.name} beside it",
                                        f"no_{fields.text}", key)
                text = self._read_text(text_file, key)
            except BadInputError as err:
                on_bad_input(err)
                continue
            yield MediaExample(key, text, functools.partial(read_media_file, fields.media, file, key))

    def _jsonl_examples(self, path: Path, on_bad_input: OnBadInput) -> Iterator[MediaExample]:
        fields = self.fields
        for line, record in jsonl_records(path, on_bad_input, f"'{fields.media}' and '{fields.text}'"):
            try:
                example = self._record_example(record, path.parent, f"{path}:{line}")
            except BadInputError as err:
                on_bad_input(err)
                continue
            yield example

    def _record_example(self, record: Mapping[str, Any], folder: Path, where: str) -> MediaExample:
        media, text = self.fields.media, self.fields.text
        for key in (media, text):
            if not isinstance(record.get(key), str) or not record[key].strip():
                reason = f"no_{text}" if key == text and key not in record else "bad_field"
                raise BadInputError(f"{where}: {key!r} must be a non-empty string", reason, where)
        for key in ("prompt", "id", "group"):
            if key in record and not isinstance(record[key], str):
                raise BadInputError(f"{where}: {key!r} must be a string", "bad_field", where)
        file = Path(record[media]).expanduser()
        file = file if file.is_absolute() else folder / file
        return MediaExample(record.get("id") or where, record[text].strip(),
                            functools.partial(read_media_file, media, file, where), record.get("prompt"),
                            record.get("group"))

    def _read_text(self, path: Path, key: str) -> str:
        text = self.fields.text
        try:
            content = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise BadInputError(f"{path}: the {text} is not UTF-8 text", "not_utf8", key) from None
        if not content:
            raise BadInputError(f"{path}: the {text} is empty", f"empty_{text}", key)
        return content


def _load(task: tuple[MediaKind, MediaExample, Mapping[str, Any]]) -> tuple[MediaExample, Loaded | tuple]:
    """``kind.load`` in a worker: a BadInputError comes back as its (message, reason, location)."""
    kind, example, options = task
    try:
        return example, kind.load(example, options)
    except BadInputError as err:
        return example, (str(err), err.reason, err.location)


def read_media_file(media: str, path: Path, where: str) -> bytes:
    """The bytes of a media file; BadInputError ``missing_<media>`` or ``unreadable_<media>`` naming ``where``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{where}: {media} {path} does not exist", f"missing_{media}", where) from None
    except OSError as err:
        raise BadInputError(f"{where}: {media} {path} cannot be read ({err})", f"unreadable_{media}", where) from None


# --- shards ---------------------------------------------------------------------------------------


def write_example_split(folder: Path, prefix: str, examples: list[_Encoded], spool, dtype: np.dtype, max_rows: int,
                        min_count: int) -> dict[str, Any]:
    """Write ``examples`` as ``<prefix>-NNNNNN.tar`` shards; returns the split's manifest entry.

    The entry sums each example's ``stats`` (e.g. ``seconds`` of audio) besides its counts.
    """
    per_shard = max(1, min(max_rows, -(-len(examples) // min_count)))
    shards = []
    for index, first in enumerate(range(0, len(examples), per_shard)):
        chunk = examples[first : first + per_shard]
        parts: list[bytes] = []
        for number, example in enumerate(chunk, start=first):
            key = f"{number:09d}"
            spool.seek(example.offset)
            parts += tar_member(f"{key}.tokens.npy", _npy(example.ids.astype(dtype)))
            parts += tar_member(f"{key}.loss_mask.npy", _npy(example.loss_mask.astype(np.uint8)))
            parts += tar_member(f"{key}.{example.member}", spool.read(example.size))
            parts += tar_member(f"{key}.json", json.dumps(example.description, sort_keys=True).encode("utf-8"))
        path = folder / f"{prefix}-{index:06d}.tar"
        digest = write_atomic(path, tar_bytes(parts))
        shards.append({"path": f"{prefix}-{index:06d}.tar", "rows": len(chunk), "first_row": first,
                       "sha256": digest})
    stats = sorted({name for example in examples for name in example.stats})
    sums = {name: round(sum(float(e.stats.get(name, 0.0)) for e in examples), 3) for name in stats}
    return {"examples": len(examples), "tokens": int(sum(len(e.ids) for e in examples)),
            "trained_tokens": int(sum(int(e.loss_mask.sum()) for e in examples)), **sums, "shards": shards}


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


@dataclass(frozen=True)
class ExampleRow:
    """One stored example: its index in the split, ids, loss mask, media bytes and description."""

    index: int
    tokens: np.ndarray
    loss_mask: np.ndarray
    media: bytes
    description: dict[str, Any]


def read_example_shard(shard: ShardInfo, vocab_limit: int, media: str) -> list[ExampleRow]:
    """Every example of a media shard, checked (sha256, members, dtypes, id range); ShardError names the shard.

    ``media`` is the media member's name (``image``, ``audio``); ``vocab_limit`` is one past the
    largest valid id. The media are not decoded here: the loader does that when an example is used.
    """
    return read_samples(shard, lambda sample: _decode_row(sample, vocab_limit, media), "examples")


def _decode_row(sample: dict[str, Any], vocab_limit: int, media: str) -> ExampleRow:
    key, url = sample["__key__"], sample["__url__"]
    files = [name for name in sample if name.startswith(f"{media}.")]
    missing = [name for name in ("tokens.npy", "loss_mask.npy", "json") if name not in sample]
    if missing or len(files) != 1 or not key.isdigit():
        raise ShardError(f"sample {key!r} in {url} is malformed (missing {missing or f'its {media}'})")
    tokens, mask = load_npy(sample["tokens.npy"], key, url), load_npy(sample["loss_mask.npy"], key, url)
    if tokens.ndim != 1 or tokens.dtype.kind != "u" or mask.shape != tokens.shape or mask.dtype != np.uint8:
        raise ShardError(f"sample {key} in {url}: expected 1-D unsigned ids and a uint8 mask of the same length, got "
                         f"{tokens.dtype}{tokens.shape} and {mask.dtype}{mask.shape}")
    if tokens.size and int(tokens.max()) >= vocab_limit:
        raise ShardError(f"sample {key} in {url}: token id {int(tokens.max())} >= {vocab_limit} (vocabulary and new "
                         "ids): the shards were made with another tokenizer")
    try:
        description = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardError(f"sample {key} in {url}: its json member is not JSON ({err})") from None
    return ExampleRow(int(key), tokens, mask.astype(bool), sample[files[0]], description)
