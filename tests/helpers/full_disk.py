"""``herd.train``'s command line on a disk that fills up at one write.

``HERD_TEST_FULL_DISK=<what>:<n>``: the n-th write of ``what`` fails as a full disk does (unset: a
plain run):

- ``checkpoint:<n>``: the n-th ``torch.save`` of a checkpoint writes a few bytes, then fails the way
  torch reports it: a zip-writer error raised while handling ``OSError(ENOSPC)``;
- ``export:<n>``: the n-th safetensors file of an export fails with ``OSError(ENOSPC)`` after
  leaving a partial file.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_at_checkpoint(n: int) -> None:
    import torch

    from herd.stages import checkpoint_io

    save, calls = torch.save, [0]

    def full_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < n:
            return save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        try:
            raise _no_space()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from None

    checkpoint_io.torch.save = full_save


def _fill_at_export(n: int) -> None:
    from herd.interop import modeldir

    save_file, calls = modeldir.save_file, [0]

    def full_save_file(tensors, filename, *args, **kwargs):
        calls[0] += 1
        if calls[0] < n:
            return save_file(tensors, filename, *args, **kwargs)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise _no_space()

    modeldir.save_file = full_save_file


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
        sys.path.pop(0)  # the helpers folder must not shadow installed modules (tokenizers)
    what, _, count = os.environ.get("HERD_TEST_FULL_DISK", ":").partition(":")
    if what == "checkpoint":
        _fill_at_checkpoint(int(count))
    elif what == "export":
        _fill_at_export(int(count))
    from herd.train import main

    sys.argv[0] = "herd.train"
    main()
