"""Model directories on disk: the files every herd model directory has, whatever its architecture.

A model directory holds ``config.json``, the weights as safetensors (one ``model.safetensors``,
or shards ``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``) and
optionally the tokenizer files. This module reads and writes those files. What a directory's
names and config mean belongs to the architecture's module: :mod:`herd.interop.hf` (Llama and
reward models), :mod:`herd.interop.mllama` (Llama 3.2 Vision), :mod:`herd.interop.speech`
(a Llama directory with a speech adapter beside it) and ``herd.average``.

- Every file written here gets the mode that the process's umask gives: safetensors alone
  creates its files with mode 0600, which would hide the weights from the other users of a
  shared filesystem while the rest of the directory is readable.
- Only safetensors are read: pickled ``*.bin``/``*.pt`` weights are refused, never unpickled.
- A directory is written into a hidden temporary folder beside it and moved into place only when
  every file is complete (:func:`staged_directory`): a full disk or a kill while writing leaves
  the previous directory (or none), never an empty or half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.paths import disk_full

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # where transformers >= 4.47 saves a tokenizer's chat template
)


class CheckpointError(ValueError):
    """A model directory that herd cannot load as it is."""


# ---------------------------------------------------------------------------------------- config


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The mapping in ``path/config.json``; CheckpointError naming the file when it is absent or not JSON."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist; a model directory needs {CONFIG_FILE}")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None


# --------------------------------------------------------------------------------------- weights


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a directory, single or sharded (index order)."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a safetensors index (needs 'weight_map'): {err}") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {absent}")
        return files
    single = path / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (
        f" It has {pickled}: herd never unpickles weights; convert them to safetensors first."
        if pickled
        else ""
    )
    raise CheckpointError(f"{path} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}.{hint}")


def iter_tensors(files: list[Path], device: str | torch.device) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """``(file, stored name, tensor)`` of every tensor of ``files``, read one at a time onto ``device``.

    A file that safetensors cannot read raises CheckpointError naming it.
    """
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    yield file, key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from None


# ------------------------------------------------------------------------------------- writing

STAGING = ".tmp-"  # .<name>.tmp-<pid>: a directory being written beside <name>


@contextmanager
def staged_directory(path: str | Path) -> Iterator[Path]:
    """A new hidden folder beside ``path`` to write a model directory into; it takes ``path``'s place when
    the block ends, and is removed if the block fails (``path`` is then as it was, or still absent).

    A missing ``path`` is created by one rename. An existing one keeps the files the new directory
    does not hold (anything but an earlier write's weights), and gets each new file by a rename,
    ``config.json`` last. An error with no space left on device is raised as an ``OSError``
    naming ``path``. Leftovers of a killed write (``.<name>.tmp-<pid>`` of a process that is gone)
    are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}{STAGING}*"):
        if not _process_alive(leftover.name.rsplit(STAGING, 1)[1]):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = path.with_name(f".{path.name}{STAGING}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _publish(staging, path)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        full = disk_full(err) if isinstance(err, Exception) else None
        if full is not None:
            raise OSError(full.errno, f"{os.strerror(full.errno)} while writing the model directory {path} (nothing "
                          "was left there)", str(path)) from err
        raise


def _publish(staging: Path, path: Path) -> None:
    if not path.exists():
        os.rename(staging, path)
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder: write the model directory somewhere else")
    for stale in [*path.glob("model*.safetensors"), path / SAFETENSORS_INDEX]:
        if not (staging / stale.name).exists():
            stale.unlink(missing_ok=True)  # weights of an earlier write that the new one does not replace
    for entry in sorted(staging.iterdir(), key=lambda e: e.name == CONFIG_FILE):  # config.json last
        target = path / entry.name
        if entry.is_dir() and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def _process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def shard_file_name(index: int, count: int) -> str:
    """The name of shard ``index`` (from 1) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_weights(state: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    """``state`` (stored names -> CPU tensors) into ``path``: one file, or shards of at most
    ``max_shard_bytes`` with an index. Weight files of an earlier write in ``path`` are removed first."""
    for stale in [*path.glob("model*.safetensors"), path / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], path / SAFETENSORS_FILE)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = shard_file_name(i, len(shards))
        save_safetensors(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    write_index(path, weight_map, sum(t.numel() * t.element_size() for t in state.values()))


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``path/model.safetensors.index.json``: which shard holds each tensor, and their total bytes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """``safetensors.torch.save_file``, then the mode any new file of this process gets (see the module docstring)."""
    save_file(tensors, str(file), metadata={"format": "pt"})
    os.chmod(file, 0o666 & ~process_umask())


def process_umask() -> int:
    """The process's umask (from /proc on Linux, where reading it does not change it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # elsewhere reading the umask means setting it: put it back at once
    os.umask(umask)
    return umask


# ------------------------------------------------------------------------------------- tokenizer


def tokenizer_size(tokenizer_file: Path) -> int:
    """Number of ids in a ``tokenizer.json``, added (special) tokens included."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    except Exception as err:
        raise CheckpointError(f"{tokenizer_file} is not a readable tokenizer: {err}") from None


def tokenizer_files(tokenizer: Any, staging: Path) -> tuple[Path, list[Path]]:
    """The folder that holds the tokenizer and the files to copy from it.

    A directory is used as it is (its tokenizer files only); an object with ``save_pretrained(path)``
    or ``save(path)`` is saved into ``staging``.
    """
    if isinstance(tokenizer, str | Path):
        source = Path(tokenizer)
        if not (source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer directory {source} has no tokenizer.json")
        return source, [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(staging)
    elif hasattr(tokenizer, "save"):
        tokenizer.save(staging)
    else:
        raise TypeError(
            f"cannot save tokenizer of type {type(tokenizer).__name__}: pass a directory or an "
            "object with save_pretrained(path) or save(path)"
        )
    return staging, sorted(file for file in staging.iterdir() if file.is_file())


def copy_tokenizer(source: Path, files: list[Path], path: Path) -> tuple[int | None, int | None]:
    """Copy the tokenizer files into ``path``; return its bos/eos ids when it names them.

    A tokenizer without ``tokenizer_config.json`` gets herd's, when it is a Llama 3 style
    tokenizer (it has ``<|begin_of_text|>`` and the other special tokens herd needs).
    """
    if source.resolve() != path.resolve():
        for file in files:
            shutil.copyfile(file, path / file.name)  # content only: the export's file mode, not the source's
    if not (source / "tokenizer_config.json").is_file():
        from herd.data.tokenizer import Tokenizer

        try:
            herd_tokenizer = Tokenizer.load(source)
        except ValueError as err:
            logger.warning(
                "%s has no tokenizer_config.json and is not a Llama 3 style tokenizer, so the export "
                "names no bos/eos token: %s",
                source,
                err,
            )
        else:
            herd_tokenizer.save(path)  # tokenizer.json and herd's default tokenizer_config.json
    return _special_ids(path)


def end_of_text_id(path: Path) -> int | None:
    """The id of ``<|end_of_text|>`` in ``path/tokenizer.json``, if there is one."""
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file)).token_to_id("<|end_of_text|>")


def _special_ids(path: Path) -> tuple[int | None, int | None]:
    config_file, tokenizer_file = path / "tokenizer_config.json", path / "tokenizer.json"
    if not (config_file.is_file() and tokenizer_file.is_file()):
        return None, None
    from tokenizers import Tokenizer

    tok_config = json.loads(config_file.read_text())
    tok = Tokenizer.from_file(str(tokenizer_file))

    def token_id(key: str) -> int | None:
        token = tok_config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return tok.token_to_id(token) if isinstance(token, str) else None

    return token_id("bos_token"), token_id("eos_token")
