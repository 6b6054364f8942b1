"""Checkpoints that a kill never breaks, and that are read without running code from the files.

Writing
-------
- A single-file checkpoint (one device, DDP) is written by :class:`AtomicCheckpointIO` to
  ``<name>.tmp-<pid>`` beside the target, fsynced, then renamed over the target.
- A sharded checkpoint (``strategy=fsdp2``: a folder of ``.distcp`` files, ``.metadata`` and
  ``meta.pt``) is written by every rank into ``<name>.tmp-step<global_step>``; after a barrier,
  rank 0 publishes it with :func:`publish_checkpoint`: ``<name>`` -> ``<name>.old-<pid>``, then
  the temporary -> ``<name>``, then the old folder is deleted. At every instant a complete
  checkpoint exists under ``<name>`` or, during the two renames, under ``<name>.old-<pid>``.
- :func:`remove_stale_temporaries` cleans a checkpoint folder after a kill: it deletes the
  ``*.tmp-*`` leftovers and finishes an interrupted swap by putting the previous checkpoint back
  under its name (a roll-back: a published checkpoint is never half new, half old).
- :func:`checkpoint_is_complete` tells a finished checkpoint from a leftover without loading it,
  :func:`recoverable_checkpoint` finds the complete one of a folder without changing it, and
  :func:`checkpoint_metadata` reads its step, epoch and ``herd`` entry without the weights.

Reading
-------
torch.distributed.checkpoint stores a sharded checkpoint's index (``.metadata``) as a plain
pickle, and ``torch.load``-s the non-tensor items of the ``.distcp`` files with
``weights_only=False``: either would run arbitrary code from a crafted folder. herd does not refuse
folders it did not write (a folder carries no trustworthy signature, and refusing would also
refuse checkpoints moved between machines or written by another tool). Instead it reads them
with restricted unpicklers:

- ``.metadata`` goes through :class:`DcpMetadataUnpickler`, which resolves only the classes a
  torch.distributed.checkpoint ``Metadata`` is made of (its dataclasses, ``torch.Size``, torch
  dtypes and layouts, paths, ``OrderedDict``); anything else is refused before it is called;
- non-tensor items (optimizer hyper-parameters) are read with ``torch.load(weights_only=True)``
  (:class:`WeightsOnlyLoadPlanner`), and so is ``meta.pt``.

:func:`check_dcp_metadata` and :func:`load_sharded` are the entry points; ``herd.export`` and the
``fsdp2`` strategy's resume use them.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from herd.paths import disk_full

TEMPORARY = ".tmp-"  # <name>.tmp-<pid> (files), <name>.tmp-step<N> (sharded folders), <name>.tmp-removing-<pid>
OLD = ".old-"  # <name>.old-<pid>: the previous checkpoint while a new one is swapped in
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the shard files
SHARDED_META = "meta.pt"  # Lightning's non-tensor entries (global_step, epoch, loops, herd, ...)
WEIGHT_ENTRIES = ("state_dict", "optimizer_states")


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
        temporary = target.with_name(f"{target.name}{TEMPORARY}{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except Exception as err:
            full = disk_full(err)
            if full is None:
                raise
            # torch reports it as a zip-writer position error; name the cause and the file instead
            raise OSError(full.errno, f"{os.strerror(full.errno)} while writing the checkpoint {target} (the "
                          f"previous {target.name}, if any, is intact)", str(target)) from err
        finally:
            temporary.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any = _to_cpu, weights_only: bool | None = None) -> dict:
        """herd's checkpoints hold only tensors and plain values: they load with ``weights_only=True``."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


# ------------------------------------------------------------------------- publishing a sharded folder

def sharded_temporary(target: str | Path, global_step: int) -> Path:
    """The folder every rank writes a sharded checkpoint into before it is published as ``target``."""
    target = Path(target)
    return target.with_name(f"{target.name}{TEMPORARY}step{global_step}")


def publish_checkpoint(temporary: str | Path, target: str | Path) -> None:
    """Move a finished sharded checkpoint folder into place as ``target`` (one process calls this).

    An existing ``target`` (file or folder) is first renamed to ``<target>.old-<pid>`` and deleted
    only after the new folder holds the name, so a complete checkpoint survives a kill at any point.
    """
    temporary, target = Path(temporary), Path(target)
    _fsync_tree(temporary)
    if not (target.exists() or target.is_symlink()):
        os.rename(temporary, target)
        _fsync_directory(target.parent)
        return
    old = target.with_name(f"{target.name}{OLD}{os.getpid()}")
    _remove(old)
    os.rename(target, old)
    os.rename(temporary, target)
    _fsync_directory(target.parent)
    _remove(old)


def discard_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint file or folder so that no half-deleted folder is left under its name.

    A folder is renamed to ``<name>.tmp-removing-<pid>`` first (which :func:`remove_stale_temporaries`
    deletes if a kill interrupts the deletion).
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f"{path.name}{TEMPORARY}removing-{os.getpid()}")
        _remove(doomed)
        os.rename(path, doomed)
        _remove(doomed)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(checkpoint_dir: str | Path) -> list[Path]:
    """Clean a checkpoint folder after a killed save; returns the paths removed or restored.

    - ``*.tmp-*`` files and folders (unfinished single-file or sharded saves, interrupted
      deletions) are deleted;
    - ``<name>.old-*`` (the previous checkpoint during a swap) is deleted when ``<name>`` exists,
      and otherwise renamed back to ``<name>`` if it is complete (the newest complete one wins).

    Call it before training starts, never while a run is saving into the folder. Several processes
    may call it at once (every rank at start-up): what another one already removed or restored is
    skipped. herd's fsdp2 strategy also calls it on rank 0 for its own checkpoint folders. The
    caller reports the returned paths (a restored one exists again, a removed one does not).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    changed: list[Path] = []
    entries = sorted(checkpoint_dir.iterdir())
    for entry in entries:
        if TEMPORARY in entry.name:
            _remove(entry)
            changed.append(entry)
    olds: dict[str, list[Path]] = {}
    for entry in entries:
        if OLD in entry.name and TEMPORARY not in entry.name:
            olds.setdefault(entry.name.split(OLD)[0], []).append(entry)
    for name, candidates in olds.items():
        target = checkpoint_dir / name
        if not _exists(target):
            complete = [c for c in candidates if checkpoint_is_complete(c)]
            if complete:
                newest = max(complete, key=_mtime)
                candidates.remove(newest)
                try:
                    os.rename(newest, target)
                    _fsync_directory(checkpoint_dir)
                    changed.append(target)
                except FileNotFoundError:  # another process restored it first
                    pass
        for candidate in candidates:
            _remove(candidate)
            changed.append(candidate)
    return changed


def recoverable_checkpoint(path: str | Path) -> Path | None:
    """``path`` if it is a complete checkpoint, else the newest complete ``<path>.old-*`` (a swap
    killed between its renames), else None. Reads only: for folders of other runs, which
    :func:`remove_stale_temporaries` must not touch while they may still be running."""
    path = Path(path)
    if checkpoint_is_complete(path):
        return path
    previous = [p for p in path.parent.glob(f"{path.name}{OLD}*") if checkpoint_is_complete(p)]
    return max(previous, key=_mtime) if previous else None


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return -1.0


def _remove(path: Path) -> None:
    """Delete a file or folder; what is already gone (removed by another process) is skipped."""
    if path.is_dir() and not path.is_symlink():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=_skip_missing)
        else:
            shutil.rmtree(path, onerror=lambda function, name, info: _skip_missing(function, name, info[1]))
    else:
        path.unlink(missing_ok=True)


def _skip_missing(function, name, error: BaseException) -> None:
    if not isinstance(error, FileNotFoundError):
        raise error


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync the files of a folder (torch.distributed.checkpoint already synced its shards) and the folder."""
    for file in folder.iterdir():
        if file.is_file() and not file.name.endswith(".distcp"):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_directory(folder)


# -------------------------------------------------------------------------------- inspecting checkpoints

def checkpoint_is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a finished checkpoint, checked without loading its tensors.

    A file must be a readable torch zip archive; a sharded folder must hold ``meta.pt`` and a
    ``.metadata`` that reads safely and whose shard files are all present at full length.
    Temporaries (``*.tmp-*``) are never complete.
    """
    path = Path(path)
    if TEMPORARY in path.name:
        return False
    if path.is_file():
        return _is_torch_archive(path)
    if path.is_dir():
        if not (path / SHARDED_INDEX).is_file() or not _is_torch_archive(path / SHARDED_META):
            return False
        try:
            metadata = check_dcp_metadata(path)
        except ValueError:
            return False
        return _shards_present(path, metadata)
    return False


def _is_torch_archive(path: Path) -> bool:
    """A cheap test for a torch.save file: its zip central directory (written last) reads back."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _shards_present(folder: Path, metadata: Metadata) -> bool:
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if relative is None:
            continue
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[relative] = max(needed.get(relative, 0), end)
    for relative, size in needed.items():
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            return False
        file = folder / relative
        if not file.is_file() or file.stat().st_size < size:
            return False
    return True


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The non-tensor top-level entries of a checkpoint (``global_step``, ``epoch``, ``herd``, ...).

    The weights are not read into memory: a file is memory-mapped (``weights_only=True``) and its
    ``state_dict``, ``optimizer_states`` and other tensor entries are dropped; a sharded folder's
    ``meta.pt`` holds only these entries. ``herd`` holds ``model_config`` and ``tokens_seen``.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for anything else that is
    not a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    file = path / SHARDED_META if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise ValueError(f"{path} is a folder but not a sharded checkpoint (no {SHARDED_META})")
    checkpoint = load_checkpoint_file(file, mmap=True)
    return {key: value for key, value in checkpoint.items()
            if key not in WEIGHT_ENTRIES and not isinstance(value, torch.Tensor)}


def load_checkpoint_file(file: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(file, weights_only=True)`` of a checkpoint file (or a sharded folder's ``meta.pt``),
    with a one-line error naming the file for anything that is not a readable checkpoint.

    Raises :class:`UnsafeCheckpointError` for a file that holds objects other than plain data (a
    crafted pickle: nothing in it is run) and ``ValueError`` for a truncated, damaged or foreign file.
    """
    file = Path(file)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        refused = [line for line in lines if "GLOBAL" in line]  # torch's weights-only reader met a class or function
        if refused:
            raise UnsafeCheckpointError(f"{file} is not a checkpoint herd can read safely ({refused[0].rstrip('.')}); "
                                        "nothing in it was loaded or run: use a checkpoint that herd wrote") from None
        after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.endswith("WeightsUnpickler error:")]
        reason = f"UnpicklingError: {after[0]}" if after else _first_sentence(err)
        raise ValueError(f"{file} is not a readable checkpoint ({reason}): it is truncated, damaged or not a torch "
                         "checkpoint; use another one, e.g. the run's checkpoints/last.ckpt") from None
    except Exception as err:  # truncated, damaged or not a torch file: torch raises RuntimeError, KeyError, ...
        raise ValueError(f"{file} is not a readable checkpoint ({_first_sentence(err)}): it is truncated, damaged "
                         "or not a torch checkpoint; use another one, e.g. the run's checkpoints/last.ckpt") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{file} is not a checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def _first_sentence(err: BaseException) -> str:
    """The start of an error's message, on one line (torch's run over several sentences and lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = text.split(". ")[0]
    return f"{type(err).__name__}: {text[:200]}"


# ----------------------------------------------------------------- reading torch.distributed.checkpoint safely

def _torch_dtypes() -> set[str]:
    return {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout (torch.strided) by name, from a fixed table
    "torch": {"Size", *_torch_dtypes()},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code or build objects a checkpoint never holds when read."""


class DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint ``.metadata``, resolving only the classes it is made of."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} refers to {module}.{name}, which a torch.distributed.checkpoint .metadata never "
            "holds: this is not a checkpoint herd can read safely, so nothing in it was loaded")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.source} uses persistent ids: this is not a checkpoint herd can read "
                                    "safely, so nothing in it was loaded")


def read_dcp_metadata(file: str | Path) -> Metadata:
    """A ``.metadata`` file read with :class:`DcpMetadataUnpickler`; ValueError if it is anything else."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            metadata = DcpMetadataUnpickler(f, file).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError as err:
        raise ValueError(f"{file.parent} is not a sharded checkpoint (no {file.name})") from err
    except Exception as err:  # any malformed pickle: truncated, wrong types, unknown opcodes
        raise ValueError(f"{file} is not a readable torch.distributed.checkpoint index ({type(err).__name__}: "
                         f"{err}); this is not a checkpoint herd can read") from err
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{file} holds a {type(metadata).__name__}, not a torch.distributed.checkpoint "
                                    "Metadata: this is not a checkpoint herd can read safely")
    return metadata


def check_dcp_metadata(path: str | Path) -> Metadata:
    """Read a sharded checkpoint's ``.metadata`` safely (``path``: the folder or the file); returns it.

    Raises ``ValueError`` (``UnsafeCheckpointError`` for a crafted file) naming the file when it is
    not an index herd can read safely. Call it before anything hands the folder to
    torch.distributed.checkpoint's own reader.
    """
    path = Path(path)
    return read_dcp_metadata(path / SHARDED_INDEX if path.is_dir() else path)


class SafeFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's FileSystemReader, reading ``.metadata`` with :class:`DcpMetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = SHARDED_INDEX if rank is None else f"__{rank}{SHARDED_INDEX}"
        metadata = read_dcp_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items must load with ``torch.load(weights_only=True)``.

    torch.distributed.checkpoint reads them with ``weights_only=False``; this planner first reads
    them with ``weights_only=True`` (which refuses anything but plain values), then hands the same
    bytes on.
    """

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as err:
            refused = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
            raise UnsafeCheckpointError(
                f"checkpoint item {read_item.dest_index.fqn!r} is not plain data ({refused[0] if refused else err}): "
                "this is not a checkpoint herd can read safely, so it was not loaded") from err
        super().load_bytes(read_item, io.BytesIO(data))


def load_sharded(state: dict[str, Any], path: str | Path) -> None:
    """``torch.distributed.checkpoint.load`` into ``state`` in place, reading the folder safely.

    A collective when a process group is initialised (every rank calls it), single-process otherwise.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    check_dcp_metadata(path)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # no_dist says so
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=WeightsOnlyLoadPlanner(),
                     no_dist=not distributed)
    except dcp.api.CheckpointException as err:  # one rank's refusal, wrapped: raise it as it is
        for failure, _ in err.failures.values():
            if isinstance(failure, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{path}: {failure}") from err
        raise
