"""The weighted mean of several model directories' weights, as a new model directory.

    python -m herd.average 'models=[runs/a/export,runs/b/export]' output=averaged
    python -m herd.average 'models=[a,b,c]' 'weights=[2,1,1]' output=averaged dtype=bf16

Llama 3 averages the models of runs with different data or hyperparameters at each post-training
stage (reward model, SFT, DPO). The models must be the same network: policies
(``LlamaForCausalLM``) or reward models (``LlamaForSequenceClassification``) of one shape and
vocabulary, with the same tokenizer. Anything else is refused before a byte is written, with a
message that names the difference and the two directories. Their ``config.json`` files may differ
only in bookkeeping keys (:data:`IGNORED_CONFIG_KEYS`).

Weights: one non-negative number per model, normalised to sum to 1 (``[2, 1, 1]`` gives
``[0.5, 0.25, 0.25]``); none means equal weights. Each output tensor is ``sum_i w_i * t_i``,
computed in float32 and stored in its dtype in the first model (or ``dtype``).

Memory: tensors are read one at a time from the memory-mapped safetensors files, and the output is
written shard by shard (``max_shard_gb``), so averaging any number of 8B models holds one output
shard, one float32 accumulator and one input tensor at a time, well under two models' worth.

The output holds the first model's ``config.json`` and tokenizer files, and ``average.json``
(the models and the normalised weights). It is written into a temporary folder beside ``output``
and renamed into place when complete, so an interrupted run never leaves a directory that looks
like a model. An existing ``output`` is refused unless ``overwrite=true``. Its files get the mode
the process's umask gives, as exports do (:mod:`herd.interop.modeldir`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from safetensors import safe_open

from herd.cli import user_errors
from herd.dtypes import DTYPES
from herd.interop import gguf, hf, modeldir
from herd.paths import resolve
from herd.presets import config_dir

logger = logging.getLogger(__name__)

AVERAGE_FILE = "average.json"
# config.json keys that say how a directory was written, not what network it holds.
IGNORED_CONFIG_KEYS = frozenset({"transformers_version", "dtype", "torch_dtype", "_name_or_path"})
AVERAGE_DTYPES = ("fp32", "bf16", "fp16")  # names of herd.dtypes.DTYPES


class AverageError(ValueError):
    """Models that cannot be averaged, or options that make no sense; the message names the problem."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor is and what it looks like, read from the safetensors header only."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "F32", "BF16"


@dataclass(frozen=True)
class ModelDir:
    """A model directory's config.json, tensor layout and tokenizer fingerprint (None: no tokenizer)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    tokenizer: str | None

    @property
    def architecture(self) -> str:
        """``LlamaForCausalLM`` or ``LlamaForSequenceClassification`` (the first listed)."""
        return (self.config.get("architectures") or ["?"])[0]


def read_model_dir(path: str | Path) -> ModelDir:
    """The layout of one model directory, without reading any weights."""
    path = Path(path)
    if not path.is_dir():
        raise AverageError(f"{path} is not a directory; give exported model directories (config.json + safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AverageError(f"{path} has no config.json, so it is not a model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AverageError(f"{config_file} is not valid JSON: {err}") from None
    tensors: dict[str, TensorInfo] = {}
    try:
        files = modeldir.weight_files(path)
    except modeldir.CheckpointError as err:
        raise AverageError(str(err)) from None
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    view = handle.get_slice(name)
                    tensors[name] = TensorInfo(file, tuple(view.get_shape()), view.get_dtype())
        except Exception as err:  # safetensors raises its own error types for a damaged or truncated file
            raise AverageError(f"{file} is not a readable safetensors file ({' '.join(str(err).split())}): it is "
                               "damaged or truncated; export or copy that model again") from None
    return ModelDir(path, config, tensors, _tokenizer_fingerprint(path))


def _tokenizer_fingerprint(path: Path) -> str | None:
    if not (path / "tokenizer.json").is_file():
        return None
    from herd.data.tokenizer import Tokenizer

    try:
        return Tokenizer.load(path).fingerprint
    except ValueError as err:  # TokenizerError names the file at fault (tokenizer.json or tokenizer_config.json)
        raise AverageError(str(err)) from None


def check_compatible(models: Sequence[ModelDir]) -> None:
    """Refuse models that are not the same network, naming the first difference found.

    In order: architecture (policy vs reward model), shape and vocabulary (from config.json), the
    other config.json keys, the tokenizer (by fingerprint; all or none must have one), and the
    stored tensors' names, shapes and kinds.
    """
    first = models[0]
    for other in models[1:]:
        pair = f"{first.path} vs {other.path}"
        if first.architecture != other.architecture:
            raise AverageError(f"different architectures: {first.architecture} vs {other.architecture} ({pair}); "
                               "a policy and a reward model cannot be averaged")
        _check_shapes(first, other, pair)
        keys = (set(first.config) | set(other.config)) - IGNORED_CONFIG_KEYS
        differing = sorted(k for k in keys if first.config.get(k) != other.config.get(k))
        if differing:
            shown = "; ".join(f"{k}: {first.config.get(k)!r} vs {other.config.get(k)!r}" for k in differing[:5])
            raise AverageError(f"the config.json files differ ({pair}): {shown}")
        if first.tokenizer != other.tokenizer:
            what = ("one has no tokenizer.json" if None in (first.tokenizer, other.tokenizer)
                    else f"fingerprints {first.tokenizer[:12]}... vs {other.tokenizer[:12]}...")
            raise AverageError(f"different tokenizers ({pair}): {what}; models trained with different tokenizers "
                               "give the same ids other meanings")
        _check_tensors(first, other, pair)


def _check_shapes(first: ModelDir, other: ModelDir, pair: str) -> None:
    try:
        a, b = hf.config_from_hf(first.config, str(first.path)), hf.config_from_hf(other.config, str(other.path))
    except modeldir.CheckpointError as err:
        raise AverageError(str(err)) from None
    if a.vocab_size != b.vocab_size:
        raise AverageError(f"different vocabularies: vocab_size {a.vocab_size} vs {b.vocab_size} ({pair})")
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim", "tie_embeddings")
    differing = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if differing:
        raise AverageError(f"different shapes: {'; '.join(differing)} ({pair})")


def _check_tensors(first: ModelDir, other: ModelDir, pair: str) -> None:
    only_first, only_other = sorted(set(first.tensors) - set(other.tensors)), sorted(set(other.tensors) - set(first.tensors))
    if only_first or only_other:
        raise AverageError(f"different tensors ({pair}): only in the first {only_first[:4]}, only in the second "
                           f"{only_other[:4]}")
    for name, info in first.tensors.items():
        theirs = other.tensors[name]
        if info.shape != theirs.shape:
            raise AverageError(f"different shapes: tensor {name} is {list(info.shape)} vs {list(theirs.shape)} "
                               f"({pair})")
        if _is_float(info.dtype) != _is_float(theirs.dtype):
            raise AverageError(f"tensor {name} is {info.dtype} vs {theirs.dtype} ({pair}): only floating-point "
                               "tensors can be averaged")


def _is_float(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith(("F", "BF"))


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` divided by their sum (equal weights when None); refused unless finite, >= 0, not all 0."""
    if count < 1:
        raise AverageError("models is empty: give at least one model directory")
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise AverageError(f"weights has {len(values)} values for {count} models: give one weight per model")
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise AverageError(f"weights {values} must be finite, non-negative and not all 0 (they are normalised "
                           "to sum to 1)")
    total = sum(values)
    return [w / total for w in values]


def average(
    models: Sequence[str | Path],
    output: str | Path,
    weights: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write the weighted mean of ``models`` to the directory ``output``; returns it.

    See the module docstring for the checks, the weights and the memory bound. ``dtype`` converts
    every floating-point tensor on the way out (None keeps the first model's dtypes).
    Non-floating-point tensors must be equal in every model and are copied.
    """
    output = Path(output)
    members = [read_model_dir(path) for path in models]
    shares = normalised_weights(weights, len(members))
    if any(output.resolve() == m.path.resolve() for m in members):
        raise AverageError(f"output={output} is one of the models; write the average to a new directory")
    if output.exists() and not overwrite:
        raise AverageError(f"output={output} already exists; choose another directory or pass overwrite=true")
    check_compatible(members)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_weights(members, shares, staging, dtype, max_shard_bytes)
        _write_metadata(members, shares, staging, dtype)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _write_weights(members: Sequence[ModelDir], shares: Sequence[float], out: Path, dtype: torch.dtype | None,
                   max_shard_bytes: int) -> None:
    """Average tensor by tensor into shards of at most ``max_shard_bytes`` (one file when it fits)."""
    first = members[0]
    out_dtypes = {name: _out_dtype(info, dtype) for name, info in first.tensors.items()}
    shards = _plan_shards(first.tensors, out_dtypes, max_shard_bytes)
    names = [modeldir.SAFETENSORS_FILE] if len(shards) == 1 else [
        modeldir.shard_file_name(i, len(shards)) for i in range(1, len(shards) + 1)]
    with ExitStack() as stack:
        handles = [{file: stack.enter_context(safe_open(str(file), framework="pt"))
                    for file in dict.fromkeys(info.file for info in m.tensors.values())} for m in members]
        for shard, file_name in zip(shards, names, strict=True):
            tensors = {name: _mean_tensor(name, members, handles, shares, out_dtypes[name]) for name in shard}
            modeldir.save_safetensors(tensors, out / file_name)
            del tensors
    if len(shards) > 1:
        total = sum(math.prod(first.tensors[n].shape) * out_dtypes[n].itemsize for n in first.tensors)
        weight_map = {name: file_name for shard, file_name in zip(shards, names, strict=True) for name in shard}
        modeldir.write_index(out, weight_map, total)


def _out_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    stored = _TORCH_DTYPES.get(info.dtype)
    if stored is None:
        raise AverageError(f"{info.file}: tensors of dtype {info.dtype} are not supported")
    return dtype if dtype is not None and stored.is_floating_point else stored


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def _plan_shards(tensors: dict[str, TensorInfo], dtypes: dict[str, torch.dtype], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in tensors.items():
        nbytes = math.prod(info.shape) * dtypes[name].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _mean_tensor(name: str, members: Sequence[ModelDir], handles: list[dict[Path, Any]], shares: Sequence[float],
                 out_dtype: torch.dtype) -> torch.Tensor:
    """``sum_i share_i * tensor_i`` in float32 (or the tensor itself when it is not floating-point)."""
    total: torch.Tensor | None = None
    for member, files, share in zip(members, handles, shares, strict=True):
        tensor = files[member.tensors[name].file].get_tensor(name)
        if not tensor.is_floating_point():
            if total is None:
                total = tensor
            elif not torch.equal(total, tensor):
                raise AverageError(f"tensor {name} ({tensor.dtype}) differs between {members[0].path} and "
                                   f"{member.path}: only floating-point tensors can be averaged")
            continue
        if total is None:
            total = tensor.float().mul_(share)
        else:
            total.add_(tensor.float(), alpha=share)
        del tensor
    assert total is not None
    return total.to(out_dtype).contiguous()


def _write_metadata(members: Sequence[ModelDir], shares: Sequence[float], out: Path, dtype: torch.dtype | None) -> None:
    first = members[0]
    config = dict(first.config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in modeldir.TOKENIZER_FILES:
        if (first.path / name).is_file():
            shutil.copyfile(first.path / name, out / name)
    record = {"models": [str(m.path) for m in members], "weights": list(shares)}
    (out / AVERAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _model_dirs(models) -> list[Path]:
    """The configured models as directories: a .gguf file is converted once (herd.interop.gguf)."""
    try:
        return [gguf.model_dir(resolve(str(m))) for m in models]
    except modeldir.CheckpointError as err:
        raise AverageError(str(err)) from None


def run(cfg: DictConfig) -> Path:
    """Average ``cfg.models`` into ``cfg.output`` as configured (see ``configs/average.yaml``)."""
    models = cfg.models
    if isinstance(models, str) or not isinstance(models, ListConfig | list | tuple):
        raise AverageError("models must be a list of model directories: 'models=[dir_a,dir_b]'")
    if cfg.dtype is not None and cfg.dtype not in AVERAGE_DTYPES:
        raise AverageError(f"dtype={cfg.dtype!r}: use one of {sorted(AVERAGE_DTYPES)}, or null to keep the stored "
                           "dtypes")
    if not float(cfg.max_shard_gb) > 0:
        raise AverageError(f"max_shard_gb={cfg.max_shard_gb}: give a positive size in GiB")
    weights = list(cfg.weights) if cfg.weights is not None else None
    shares = normalised_weights(weights, len(models))
    out = average(_model_dirs(models), resolve(str(cfg.output)), weights,
                  dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
                  max_shard_bytes=int(float(cfg.max_shard_gb) * 1024**3), overwrite=bool(cfg.overwrite))
    listed = ", ".join(f"{Path(str(m))} x {s:.3g}" for m, s in zip(models, shares, strict=True))
    print(f"herd.average: {out} = {listed}")
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="average")
def main(cfg: DictConfig) -> None:
    """Command-line entry; mistakes in the options or the models exit with status 2 and one message."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors("herd.average", (AverageError, OSError)):
        run(cfg)


if __name__ == "__main__":
    main()
