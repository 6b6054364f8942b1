"""herd's data pipeline: tokenizer, chat format, embedded corpus, dialogs, packing, shards, DataModule.

Names are imported lazily, so that light users (tokenizer worker processes, herd.prepare) do
not pay for importing torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Tokenizer": "herd.data.tokenizer",
    "train_tokenizer": "herd.data.tokenizer",
    "llama3_special_tokens": "herd.data.tokenizer",
    "EncodedDialog": "herd.data.chat",
    "encode_dialog": "herd.data.chat",
    "render_dialog": "herd.data.chat",
    "Document": "herd.data.inputs",
    "iter_documents": "herd.data.kinds.text",
    "stdlib_prose": "herd.data.embedded.corpus",
    "stdlib_code": "herd.data.embedded.corpus",
    "Dialog": "herd.data.kinds.dialog",
    "iter_dialogs": "herd.data.kinds.dialog",
    "dialog_encoder": "herd.data.kinds.dialog",
    "pack_documents": "herd.data.packing",
    "Rechunker": "herd.data.packing",
    "WholePacker": "herd.data.packing",
    "IGNORE_INDEX": "herd.constants",
    "Manifest": "herd.data.manifest",
    "ManifestError": "herd.data.manifest",
    "ShardError": "herd.data.shards",
    "PackedDataModule": "herd.data.loaders.packed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'herd.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
