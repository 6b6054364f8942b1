"""herd.inspect: print one prepared row with the tokens a model is trained on marked.

    python -m herd.inspect data_dir=data/prepared/sft source=sft split=train row=0
    python -m herd.inspect data_dir=data/prepared/stdlib source=prose row=12 | less

The row is read from its shard and checked as training reads it (``herd.data.shards``), and its
targets are computed as training computes them (``herd.data.packing.Rechunker`` at the stored
length): a token is *trained* when some position predicts it, so for a dialog source exactly
the assistant's tokens, for a text source every token after the first of a document.

In a terminal, trained tokens are green and the others dim, each document starts with a
``<<doc N>>`` marker and the padding at the end of a row is summarised. When stdout is not a
terminal (a pipe, a file), the same is written as plain text with trained spans in ``[[...]]``.
A legend and the counts (tokens, trained tokens, documents, padding) follow the row.

``source`` defaults to the manifest's first source. A bad value (no manifest, unknown source,
row out of range, damaged shard) prints ``herd.inspect: <message>`` on stderr and exits with
status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.text import Text

from herd.cli import user_errors
from herd.data.manifest import Manifest, ManifestError
from herd.data.packing import IGNORE_INDEX, PAD_DOCUMENT_ID, Rechunker
from herd.data.shards import SPLITS, ShardError, read_shard
from herd.data.tokenizer import Tokenizer
from herd.paths import is_url, repo_root, resolve_location

LEGEND_PLAIN = (
    "legend: [[...]] trained on (the token before predicts it), <<doc N>> start of document N, "
    "<<padding: N tokens>> the unused end of the row"
)


class InspectError(ValueError):
    """A data_dir, source, split or row that herd.inspect cannot show; the message says why."""


@dataclass(frozen=True)
class RowView:
    """One stored row and which of its tokens are trained on.

    ``trained[i]`` is true when token ``i`` is the target of position ``i - 1`` in training.
    """

    source: str
    split: str
    index: int
    kind: str
    shard: str
    tokens: np.ndarray
    document_ids: np.ndarray
    trained: np.ndarray

    @property
    def documents(self) -> int:
        """Documents (or dialogs) with tokens in this row."""
        return len(np.unique(self.document_ids[self.document_ids != PAD_DOCUMENT_ID]))

    @property
    def padding(self) -> int:
        """Padding tokens in this row."""
        return int(np.count_nonzero(self.document_ids == PAD_DOCUMENT_ID))

    def counts(self) -> str:
        """The one-line summary: tokens, trained tokens, documents, padding."""
        return (
            f"row {self.index} of {self.source}/{self.split} ({self.kind}, {self.shard}): {len(self.tokens)} tokens, "
            f"{int(self.trained.sum())} trained, {self.documents} documents, {self.padding} padding"
        )


def load_row(data_dir: str, source: str | None = None, split: str = "train", row: int = 0) -> RowView:
    """Row ``row`` of ``source``'s ``split`` in the prepared folder ``data_dir``, with its trained tokens."""
    manifest = Manifest.load(resolve_location(str(data_dir)))
    names = manifest.source_names()
    source = source or (names[0] if names else None)
    if source not in names:
        raise InspectError(f"source {source!r} is not in {manifest.location}; its sources are {names}")
    if split not in SPLITS:
        raise InspectError(f"split must be one of {SPLITS}, got {split!r}")
    shards = manifest.shards(source, split)
    total = sum(shard.rows for shard in shards)
    if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < total:
        rows = f"rows 0..{total - 1}" if total else "no rows"
        raise InspectError(f"row {row!r} is out of range: {source}/{split} has {rows}")
    shard = next(s for s in shards if s.first_row <= row < s.first_row + s.rows)
    loss_mask, extras = manifest.has_loss_mask(source), manifest.extras(source)
    stored = read_shard(shard, manifest.row_len, manifest.vocab_size, loss_mask, extras)[row - shard.first_row]
    (sample,) = Rechunker(manifest.row_len - 1).add(
        stored.tokens, stored.document_ids, stored.index, stored.loss_mask
    )
    trained = np.zeros(len(stored.tokens), bool)
    trained[1:] = sample.targets != IGNORE_INDEX
    shard_name = "/".join(shard.url.rsplit("/", 2)[-2:])  # <source>/<split>-NNNNNN.tar
    return RowView(source, split, row, manifest.source_kind(source), shard_name, stored.tokens,
                   stored.document_ids, trained)  # fmt: skip


def tokenizer_of(data_dir: str) -> Tokenizer:
    """The tokenizer saved with a prepared folder."""
    location = Manifest.load(resolve_location(str(data_dir))).tokenizer_location
    if is_url(location):
        raise InspectError(
            f"the tokenizer of {data_dir} is at {location}; herd.inspect reads local folders only"
        )
    return Tokenizer.load(location)


@dataclass(frozen=True)
class _Piece:
    """A run of tokens shown one way: a document marker, trained text, other text or padding."""

    kind: str  # "doc", "trained", "other", "padding"
    text: str


def _pieces(view: RowView, tokenizer: Tokenizer) -> Iterator[_Piece]:
    """The row as runs of equally shown tokens, with a marker where each document starts."""
    docs, number = view.document_ids, 0
    start = 0
    while start < len(view.tokens):
        doc = docs[start]
        if doc == PAD_DOCUMENT_ID:
            end = start + int(np.argmax(np.append(docs[start:] != PAD_DOCUMENT_ID, True)))
            yield _Piece("padding", f"<<padding: {end - start} tokens>>")
            start = end
            continue
        if start == 0 or docs[start - 1] != doc:
            number += 1
            yield _Piece("doc", f"<<doc {number}>>")
        end = start + 1
        while end < len(view.tokens) and docs[end] == doc and view.trained[end] == view.trained[start]:
            end += 1
        kind = "trained" if view.trained[start] else "other"
        yield _Piece(kind, tokenizer.decode(int(t) for t in view.tokens[start:end]))
        start = end


def render_plain(view: RowView, tokenizer: Tokenizer) -> str:
    """The row as plain text: trained spans in ``[[...]]``, then the legend and the counts."""
    parts = [f"[[{p.text}]]" if p.kind == "trained" else p.text for p in _pieces(view, tokenizer)]
    return "".join(parts) + "\n\n" + LEGEND_PLAIN + "\n" + view.counts()


_STYLES = {"doc": "bold black on cyan", "trained": "green", "other": "dim", "padding": "dim italic"}


def render_rich(view: RowView, tokenizer: Tokenizer) -> Text:
    """The row as rich Text: trained tokens green, others dim, document markers and padding styled."""
    text = Text()
    for piece in _pieces(view, tokenizer):
        text.append(piece.text, style=_STYLES[piece.kind])
    text.append("\n\nlegend: ")
    text.append("trained on", style=_STYLES["trained"])
    text.append(", ")
    text.append("not trained on", style=_STYLES["other"])
    text.append(", ")
    text.append("<<doc N>>", style=_STYLES["doc"])
    text.append(" start of document N, ")
    text.append("<<padding: N tokens>>", style=_STYLES["padding"])
    text.append(" the unused end of the row\n" + view.counts())
    return text


def show_row(
    view: RowView,
    tokenizer: Tokenizer,
    console: Console | None = None,
    file: IO[str] | None = None,
    force_terminal: bool | None = None,
) -> None:
    """Print the row: in colour on a terminal, as plain text (:func:`render_plain`) otherwise.

    ``console`` defaults to a rich Console on ``file`` (stdout), which decides whether it is a
    terminal unless ``force_terminal`` says so.
    """
    console = console or Console(file=file, force_terminal=force_terminal, highlight=False)
    if console.is_terminal:
        console.print(render_rich(view, tokenizer), soft_wrap=True)
    else:
        out = console.file
        out.write(render_plain(view, tokenizer) + "\n")
        out.flush()


def inspect(cfg: DictConfig) -> None:
    """Load and print the configured row (see configs/inspect.yaml)."""
    if not cfg.get("data_dir"):
        raise InspectError("data_dir is not set: give a folder prepared by herd.prepare")
    row = cfg.get("row", 0)
    view = load_row(str(cfg.data_dir), cfg.get("source"), str(cfg.get("split", "train")), row)
    show_row(view, tokenizer_of(str(cfg.data_dir)))


@hydra.main(config_path=str(repo_root() / "configs"), config_name="inspect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: ``python -m herd.inspect data_dir=... [source=...] [split=...] [row=...]``.

    A bad value prints one line, ``herd.inspect: <message>``, and exits with status 2.
    """
    with user_errors("herd.inspect", (ValueError, OSError, ManifestError, ShardError)):
        inspect(cfg)


if __name__ == "__main__":
    main()
