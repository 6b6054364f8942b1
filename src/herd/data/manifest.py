"""A prepared folder's ``manifest.json``: tokenizer, row length, sources, their kinds and shards.

See :mod:`herd.data.shards` for the folder's layout and the shards' members. Locations listed in a
manifest never run code: they must be plain paths (relative to the manifest's folder, or
absolute) or URLs with a scheme in :data:`MANIFEST_URL_SCHEMES`. ``pipe:`` commands are accepted
only where the user writes them in the config (``data_dir``, explicit shard lists), never from a
file herd reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import webdataset as wds

from herd.data.packing import EXTRA_MEMBERS
from herd.data.shards import BASE_MEMBERS, LAYOUTS, ShardInfo
from herd.paths import resolve_location, url_scheme

MANIFEST_FILE = "manifest.json"
FORMAT = "herd-packed-v1"
# URL schemes a manifest may name for its shards and tokenizer. Others are refused: ``pipe:``
# would run the listed text as a shell command.
MANIFEST_URL_SCHEMES = ("file", "s3", "gs", "http", "https")
# Characters a relative location may use when it is appended to a ``pipe:`` manifest location
# (one the user wrote): nothing the shell would interpret.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9._/+=@,-]+")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not fit the model."""


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (sorted keys, so identical content gives identical bytes)."""
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


# --- the manifest -------------------------------------------------------------------------------


class Manifest:
    """A prepared dataset's ``manifest.json``: tokenizer, row length, sources and their shards.

    ``location`` is a prepared folder, a manifest file, or a URL of either (the user's choice, so
    it may be a ``pipe:`` command). Shard and tokenizer paths in the manifest are relative to the
    manifest's folder, absolute, or URLs with a scheme in :data:`MANIFEST_URL_SCHEMES`; every one
    is checked when the manifest is loaded, and anything else raises :class:`ManifestError`.
    """

    def __init__(self, data: dict[str, Any], location: str) -> None:
        self.data = data
        self.location = location
        self.base = location.rsplit("/", 1)[0] if "/" in location else "."
        if not isinstance(data, dict):
            raise ManifestError(f"{location}: not a herd manifest (not a JSON object); re-run herd.prepare")
        for key in ("format", "row_len", "tokenizer", "sources"):
            if key not in data:
                raise ManifestError(f"{location}: not a herd manifest (no {key!r}); re-run herd.prepare")
        if data["format"] != FORMAT:
            raise ManifestError(
                f"{location}: format {data['format']!r} is not {FORMAT!r}; re-run herd.prepare"
            )
        self._check_locations()

    @classmethod
    def load(cls, location: str | os.PathLike[str]) -> Manifest:
        """Read a manifest from a prepared folder, a manifest path or a URL."""
        location = str(location)
        if not location.endswith(".json"):
            location = location.rstrip("/") + "/" + MANIFEST_FILE
        try:
            with wds.gopen(location, "rb") as stream:
                data = json.loads(stream.read())
        except FileNotFoundError:
            raise ManifestError(
                f"manifest not found: {location}. Prepare the data first (python -m herd.prepare) "
                "or point data_dir at a prepared folder."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(
                f"manifest {location} is not valid JSON ({err}); re-run herd.prepare"
            ) from None
        return cls(data, location)

    @property
    def row_len(self) -> int:
        """Tokens per stored row (seq_len + 1)."""
        return int(self.data["row_len"])

    def source_kind(self, source: str) -> str:
        """The kind of examples ``source`` holds: ``"text"`` (the default), ``"dialog"``, ``"preference"``."""
        self._check_source(source)
        kind = self.data["sources"][source].get("kind", "text")
        if kind not in LAYOUTS:
            raise ManifestError(
                f"source {source!r} in {self.location} is of kind {kind!r}; herd reads packed rows of the "
                f"kinds {sorted(LAYOUTS)} (re-run herd.prepare with a herd that knows it, or leave the source out)"
            )
        return kind

    def layout(self, source: str) -> dict[str, Any]:
        """The row layout of ``source`` (an entry of :data:`LAYOUTS`): its members and packing."""
        layout = self.data["sources"][source].get("layout") if self.source_kind(source) else None
        if layout is None:
            return LAYOUTS[self.source_kind(source)]
        if not isinstance(layout, dict) or not isinstance(layout.get("members"), list):
            raise ManifestError(f"{self.location}: sources.{source}.layout is malformed; re-run herd.prepare")
        return layout

    def has_loss_mask(self, source: str) -> bool:
        """True when the rows of ``source`` carry a ``loss_mask`` member (dialog and preference sources)."""
        return "loss_mask" in self.layout(source)["members"]

    def extras(self, source: str) -> tuple[str, ...]:
        """The extra members of the rows of ``source`` (``("response_ids", "ranks")`` for preferences).

        Raises ManifestError for a member herd does not know.
        """
        extras = tuple(m for m in self.layout(source)["members"] if m not in BASE_MEMBERS)
        unknown = [m for m in extras if m not in EXTRA_MEMBERS]
        if unknown:
            raise ManifestError(
                f"{self.location}: sources.{source}.layout names the member(s) {unknown}, which herd does "
                f"not know (it knows {[*BASE_MEMBERS, *EXTRA_MEMBERS]}); re-run herd.prepare with this herd"
            )
        return extras

    def whole_examples(self, source: str) -> bool:
        """True when each example of ``source`` sits whole in one row (it must be read at row_len)."""
        return self.layout(source).get("packing") == "whole"

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer the shards were made with."""
        return int(self.data["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the tokenizer the shards were made with."""
        return str(self.data["tokenizer"]["fingerprint"])

    @property
    def content_fingerprint(self) -> str:
        """A digest of what the shards hold: the tokenizer's fingerprint and each shard's source, split, rows
        and sha256, not where the files are. Data prepared again from other inputs (or with other
        settings) gets another one; the same folder moved elsewhere keeps it."""
        digest = hashlib.sha256(self.fingerprint.encode())
        for name in sorted(self.data["sources"]):
            splits = self.data["sources"][name].get("splits", {})
            for split in sorted(splits):
                for shard in splits[split].get("shards", []):
                    content = shard.get("sha256") or shard.get("path")
                    digest.update(json.dumps([name, split, shard.get("rows"), content]).encode())
        return digest.hexdigest()[:16]

    @property
    def tokenizer_location(self) -> str:
        """Where the tokenizer folder saved with the shards is."""
        return self._resolve(self.data["tokenizer"]["path"], "tokenizer.path")

    def source_names(self) -> list[str]:
        """Names of the sources in this dataset."""
        return list(self.data["sources"])

    def _check_source(self, source: str) -> None:
        if source not in self.data["sources"]:
            raise ManifestError(
                f"source {source!r} is not in manifest {self.location} (it has {self.source_names()})"
            )

    def shards(self, source: str, split: str) -> list[ShardInfo]:
        """The shards of ``source``'s ``split``, with locations resolved."""
        self._check_source(source)
        listed = self.data["sources"][source]["splits"].get(split, {}).get("shards", [])
        entry = f"sources.{source}.splits.{split}.shards"
        return [
            ShardInfo(self._resolve(s["path"], f"{entry}[{i}].path"), int(s["rows"]), int(s["first_row"]),
                      s.get("sha256"))
            for i, s in enumerate(listed)
        ]  # fmt: skip

    def check_tokenizer(
        self, expected_vocab_size: int | None, expected_fingerprint: str | None = None
    ) -> None:
        """Refuse shards made with another tokenizer than the model expects."""
        if expected_vocab_size is not None and int(expected_vocab_size) != self.vocab_size:
            raise ManifestError(
                f"vocab size mismatch: the model expects {expected_vocab_size} but the shards in "
                f"{self.location} were made with a tokenizer of {self.vocab_size}. Prepare the data "
                "with the model's tokenizer, or set the model's vocab_size to match."
            )
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise ManifestError(
                f"tokenizer fingerprint mismatch: the model expects {expected_fingerprint} but the "
                f"shards in {self.location} were made with {self.fingerprint}. Prepare the data "
                "with the model's tokenizer."
            )

    def _check_locations(self) -> None:
        """Refuse the manifest if any shard or tokenizer location it lists could run code."""
        tokenizer, sources = self.data["tokenizer"], self.data["sources"]
        if not isinstance(tokenizer, dict) or not isinstance(sources, dict):
            raise ManifestError(
                f"{self.location}: 'tokenizer' and 'sources' must be objects; re-run herd.prepare"
            )
        self._resolve(tokenizer.get("path", "tokenizer"), "tokenizer.path")
        for name, source in sources.items():
            splits = source.get("splits", {}) if isinstance(source, dict) else None
            if not isinstance(splits, dict):
                raise ManifestError(f"{self.location}: sources.{name} is malformed; re-run herd.prepare")
            for split, entry in splits.items():
                shards = entry.get("shards", []) if isinstance(entry, dict) else None
                if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
                    where = f"sources.{name}.splits.{split}.shards"
                    raise ManifestError(f"{self.location}: {where} is malformed; re-run herd.prepare")
                for i, shard in enumerate(shards):
                    self._resolve(shard.get("path"), f"sources.{name}.splits.{split}.shards[{i}].path")

    def _resolve(self, path: Any, entry: str) -> str:
        """A location listed at ``entry`` of the manifest, resolved against the manifest's folder.

        Plain paths (relative or absolute) and URLs with a scheme in :data:`MANIFEST_URL_SCHEMES`
        pass; anything else (``pipe:`` above all) raises ManifestError naming the entry.
        """
        if not isinstance(path, str) or not path or "\x00" in path:
            self._refuse(path, entry, "it is not a path")
        scheme = url_scheme(path)
        if scheme:
            if scheme not in MANIFEST_URL_SCHEMES:
                self._refuse(path, entry, f"the scheme {scheme!r} is not allowed")
            return path
        if Path(path).is_absolute():
            return path
        if url_scheme(self.base) == "pipe" and not _SHELL_SAFE.fullmatch(path):
            self._refuse(path, entry, "it would be appended to the pipe: command of data_dir, and it holds "
                         "characters the shell interprets")  # fmt: skip
        return f"{self.base}/{path}"

    def _refuse(self, path: Any, entry: str, why: str) -> None:
        raise ManifestError(
            f"manifest {self.location}: {entry} = {path!r} is refused ({why}). A manifest may list "
            "only plain file paths (relative to its folder, or absolute) and URLs with a scheme in "
            f"{', '.join(MANIFEST_URL_SCHEMES)}: a location read from a file never runs a command. Fix "
            "the manifest or re-run herd.prepare; to read shards through a command, write the pipe: "
            "location in your own config (data.data_dir, or data.sources.<name>.train / .val)."
        )


class Manifests(dict):
    """The manifests a DataModule reads, by resolved location, each loaded once."""

    def load(self, location: str | os.PathLike[str]) -> Manifest:
        """The manifest at ``location`` (a folder, a manifest file or a URL), loaded on first use."""
        resolved = resolve_location(str(location))
        if resolved not in self:
            self[resolved] = Manifest.load(resolved)
        return self[resolved]

    def source(self, name: str, options: dict[str, Any] | None, data_dir: str | None) -> tuple[Manifest, str]:
        """The manifest a configured source ``data.sources.<name>`` reads, and the source's name in it.

        The source's own ``data_dir`` wins over the top-level one; ``source`` renames it (default:
        ``name``). ValueError names the source when neither data_dir is set.
        """
        options = options or {}
        location = options.get("data_dir") or data_dir
        if location is None:
            raise ValueError(f"data.sources.{name}: no data_dir (set data.data_dir or data.sources.{name}.data_dir)")
        return self.load(location), options.get("source", name)
