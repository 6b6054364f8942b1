"""The names of torch dtypes in herd's configs (``fp32``, ``bf16``, ...), in one table.

Each command accepts the names that make sense for it (``herd.generate``: fp32 or bf16;
``herd.average``: fp16 too; FSDP and ``herd.export``: null as well) and looks them up here.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
FP32_BF16 = ("fp32", "bf16")  # what the inference commands take
FP32_BF16_OR_NULL = (None, "fp32", "float32", "bf16", "bfloat16")  # null: as stored (export), no cast (FSDP)


def torch_dtype(name: str | None, choices: Collection[str | None], key: str = "dtype",
                hint: str | None = None) -> torch.dtype | None:
    """The dtype that ``name`` stands for (None for None), refused unless ``name`` is one of ``choices``.

    The ValueError reads ``<key>=<name>: <hint>`` (by default: ``use fp32 or bf16`` with the choices).
    """
    if name not in choices:
        hint = hint or "use " + " or ".join("null" if c is None else c for c in choices)
        raise ValueError(f"{key}={name!r}: {hint}")
    return None if name is None else DTYPES[name]
