"""Checkpoint files written atomically: a kill during a write never leaves a broken file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _to_cpu(storage, location):
    return storage


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<name>.tmp-<pid>`` beside the target, fsyncs it, then renames it over the target.

    The rename is atomic on a local filesystem, so ``last.ckpt`` is always either the previous
    complete checkpoint or the new complete one. Remote paths use Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(path)
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any = _to_cpu, weights_only: bool | None = None) -> dict:
        """herd's checkpoints hold only tensors and plain values: they load with ``weights_only=True``."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
