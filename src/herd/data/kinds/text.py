"""Text sources for ``herd.prepare``: documents, tokenized in worker processes, packed as a stream.

Inputs are read by :func:`iter_documents` (text files, folders, jsonl with the
text in ``text_field``, the embedded ``stdlib:prose`` / ``stdlib:code`` / ``stdlib:passkey``).
Each non-empty document is tokenized (in ``num_proc`` processes), wrapped in
``<|begin_of_text|> .. <|end_of_text|>``, assigned to ``val`` with probability ``val_fraction``
by hashing its id, and appended to its split's stream; each split's stream is cut into rows of
``seq_len + 1`` tokens (layout ``text`` of ``herd.data.shards.LAYOUTS``: a document may continue
in the next row, every next token of a document is a target). Empty documents are skipped and
counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from herd.data.embedded.corpus import STDLIB_CODE, STDLIB_PROSE, stdlib_code, stdlib_prose
from herd.data.embedded.passkey import STDLIB_PASSKEY, passkey_options, stdlib_passkey
from herd.data.inputs import Document, OnBadInput, file_documents, folder_documents, raise_bad_input
from herd.data.kinds import BadInputs, Job, SourceSpec, assign_split, splits_summary
from herd.data.packing import with_boundaries
from herd.data.shards import LAYOUTS, SPLITS

_BATCH_CHARS = 1 << 18  # text per task sent to a tokenizer process
_BATCH_DOCS = 1024


def iter_documents(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    text_field: str = "text",
    glob: str = "**/*",
    on_bad_input: OnBadInput = raise_bad_input,
) -> Iterator[Document]:
    """Documents of one source's inputs, in order.

    Each input is ``stdlib:prose``, ``stdlib:code``, a text file (one document), a ``.jsonl``
    file (one document per line, text in ``text_field``) or a folder (every file matching
    ``glob``, sorted, each read as text or jsonl by its suffix). A file or jsonl line that is
    not text goes to ``on_bad_input`` (which raises by default); if it returns, the input is
    skipped. Missing inputs raise FileNotFoundError.
    """
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        yield from _documents_of(str(item), text_field, glob, on_bad_input)


def _documents_of(item: str, text_field: str, glob: str, on_bad_input: OnBadInput) -> Iterator[Document]:
    if item == STDLIB_PROSE:
        yield from stdlib_prose()
    elif item == STDLIB_CODE:
        yield from stdlib_code()
    elif item == STDLIB_PASSKEY or item.startswith(STDLIB_PASSKEY + "?"):
        yield from stdlib_passkey(**passkey_options(item))
    else:
        path = Path(item).expanduser()
        if path.is_dir():
            yield from folder_documents(path, text_field, glob, on_bad_input)
        elif path.is_file():
            yield from file_documents(path, path.name, text_field, on_bad_input)
        else:
            raise FileNotFoundError(
                f"input not found: {path} (neither a file nor a folder). Fix the source's input "
                f"path, or use {STDLIB_PROSE!r} / {STDLIB_CODE!r} for the embedded corpus."
            )



class TextKind:
    """Plain documents; see the module docstring."""

    name = "text"
    options: Mapping[str, Any] = {"text_field": "text", "glob": "**/*"}
    on_bad_input = "error"
    max_bad_fraction = None

    def check(self, spec: SourceSpec) -> None:
        """Text options are free-form strings: nothing to check."""

    def documents(self, spec: SourceSpec, on_bad_input: BadInputs) -> Iterator[Document]:
        """The source's documents in order; bad inputs go to ``on_bad_input``."""
        return iter_documents(
            spec.inputs, str(spec.options["text_field"]), str(spec.options["glob"]), on_bad_input
        )

    def texts(self, spec: SourceSpec, val_fraction: float, on_bad_input: BadInputs) -> Iterator[str]:
        """The text of every non-empty train document."""
        for doc in self.documents(spec, on_bad_input):
            if doc.text.strip() and assign_split(doc.id, val_fraction) == "train":
                yield doc.text

    def prepare(self, spec: SourceSpec, job: Job, bad_inputs: BadInputs) -> dict[str, Any]:
        """Tokenize the documents into per-split streams and write them as shards."""
        buffers = job.buffers(spec.name)
        counts: dict[str, Any] = {"documents": 0, "empty_documents": 0, "tokens": 0}
        task = job.progress.add_task(f"tokenize {spec.name}", total=None)
        batches = _batches(self.documents(spec, bad_inputs), counts)
        tokenizer = job.tokenizer
        for docs, encoded in job.pool.encode(batches, lambda batch: [doc.text for doc in batch]):
            for doc, token_ids in zip(docs, encoded, strict=True):
                tokens = with_boundaries(token_ids, tokenizer.bos_id, tokenizer.eos_id)
                buffers[assign_split(doc.id, job.val_fraction)].append(tokens, counts["documents"])
                counts["documents"] += 1
                counts["tokens"] += len(tokens)
            description = f"tokenize {spec.name}: {counts['documents']:,} docs, {counts['tokens']:,} tokens"
            job.progress.update(task, advance=len(docs), description=description)
        for buffer in buffers.values():
            buffer.close()
        counts["skipped"] = bad_inputs.skipped
        bad_inputs.check(counts["documents"], f"check sources.{spec.name}.input, glob and text_field")
        counts["splits"] = {split: job.write(spec.name, split, buffers[split]) for split in SPLITS}
        return {
            "kind": self.name,
            "layout": LAYOUTS[self.name],
            "inputs": spec.inputs,
            "text_field": spec.options["text_field"],
            **counts,
        }

    def summary(self, name: str, entry: Mapping[str, Any]) -> str:
        """``name: N documents (E empty skipped), T tokens; train R rows in S shards, val ...``."""
        return (f"{name}: {entry['documents']} documents ({entry['empty_documents']} empty skipped), "
                f"{entry['tokens']} tokens; {splits_summary(entry)}")


def _batches(documents: Iterator[Document], counts: dict[str, int]) -> Iterator[list[Document]]:
    """Non-empty documents in batches of about _BATCH_CHARS; empty ones are counted."""
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        if not doc.text.strip():
            counts["empty_documents"] += 1
            continue
        batch.append(doc)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


TEXT = TextKind()
