"""``herd.train``'s command line, with a SIGKILL injected at one moment of a checkpoint save.

Tests of atomic checkpoints run this file instead of ``python -m herd.train``. Lightning starts the
other ranks by re-running ``sys.argv[0]`` (this file) with the same arguments and environment, so
every rank installs the same patch; the patch then fires on the rank it names.

``HERD_TEST_KILL=<moment>:<n>`` picks the moment (only the n-th occurrence is killed; unset: a
plain run):

- ``shard1:<n>``: rank 1, while it writes the shard file of its n-th save (one tensor written,
  a few stray bytes after it);
- ``publish:<n>``: rank 0, at its n-th publish, when every rank has finished writing the
  temporary folder and nothing has been renamed yet;
- ``swap:<n>``: rank 0, at its n-th rename of a finished temporary onto the checkpoint's name,
  after the previous checkpoint was moved aside;
- ``delete_old:<n>``: rank 0, while it deletes the previous checkpoint for the n-th time after the
  new one took its name (one file of it gone).

``HERD_TEST_KILL_MARK=<file>``: written just before the kill, so a test can tell the kill from
any other way the run could end.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path


def _die() -> None:
    mark = os.environ.get("HERD_TEST_KILL_MARK")
    if mark:
        Path(mark).write_text(os.environ["HERD_TEST_KILL"])
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(n: int):
    calls = 0

    def reached() -> bool:
        nonlocal calls
        calls += 1
        return calls == n

    return reached


def _kill_while_writing_shards(n: int) -> None:
    from torch.distributed.checkpoint import filesystem

    saves = _counter(n)
    state = {"armed": False, "items": 0}
    write_data, write_item = filesystem._FileSystemWriter.write_data, filesystem._write_item

    def counting_write_data(self, *args, **kwargs):
        state["armed"] = saves()
        return write_data(self, *args, **kwargs)

    def dying_write_item(transforms, stream, *args, **kwargs):
        if state["armed"]:
            state["items"] += 1
            if state["items"] == 2:
                stream.write(b"the first bytes of a tensor that never got written")
                stream.flush()
                _die()
        return write_item(transforms, stream, *args, **kwargs)

    filesystem._FileSystemWriter.write_data = counting_write_data
    filesystem._write_item = dying_write_item


def _kill_at_publish(n: int) -> None:
    from herd.stages import checkpoint_io

    publishes, publish = _counter(n), checkpoint_io.publish_checkpoint

    def dying_publish(*args, **kwargs):
        if publishes():
            _die()
        return publish(*args, **kwargs)

    checkpoint_io.publish_checkpoint = dying_publish


def _kill_in_swap(n: int) -> None:
    renames, rename = _counter(n), os.rename

    def dying_rename(source, destination, *args, **kwargs):
        source, target = Path(source), Path(destination)
        if ".tmp-step" in source.name and source.name.split(".tmp-")[0] == target.name and renames():
            _die()
        return rename(source, destination, *args, **kwargs)

    os.rename = dying_rename


def _kill_while_deleting_old(n: int) -> None:
    deletions, rmtree = _counter(n), shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        path = Path(path)
        if ".old-" in path.name and deletions():
            next(path.glob("*.distcp")).unlink()
            _die()
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = dying_rmtree


MOMENTS = {"shard1": (1, _kill_while_writing_shards), "publish": (0, _kill_at_publish),
           "swap": (0, _kill_in_swap), "delete_old": (0, _kill_while_deleting_old)}


def main() -> None:
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
        sys.path.pop(0)  # the helpers folder must not shadow installed modules
    if os.environ.get("HERD_TEST_KILL"):
        moment, n = os.environ["HERD_TEST_KILL"].split(":")
        rank, install = MOMENTS[moment]
        if int(os.environ.get("LOCAL_RANK", "0")) == rank:
            install(int(n))
    from herd.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
