"""GGUF files (llama.cpp's format) as Hugging Face Llama directories.

llama.cpp users hold a model as one ``.gguf`` file: the architecture's shape, the tokenizer (its
vocabulary, merges, special ids and chat template) and the tensors, often quantized. herd starts
from, evaluates and exports model directories (:mod:`herd.interop.hf`), so a GGUF file is
converted once into such a directory and that directory is used:

- :func:`convert` writes ``config.json``, ``model.safetensors`` (through
  :mod:`herd.interop.modeldir`), the tokenizer files and ``generation_config.json`` for one file;
- :func:`model_dir` is the resolver that every command and stage applies to a model location: a
  path ending in ``.gguf`` is converted into herd's cache, ``$XDG_CACHE_HOME/herd/gguf/<key>/``
  (default ``~/.cache/herd``), the first time, and that directory is returned; any other path
  comes back unchanged.

The tensors are read with ``transformers``' GGUF loader (``load_gguf_checkpoint``, which needs the
``gguf`` package: ``pip install 'herd[gguf]'``). It dequantizes every tensor (Q4_K, Q8_0, F16, ...)
to float32 and undoes the permutation llama.cpp applies to the query and key weights for its
rotary layout. Nothing is unpickled: a GGUF file holds no pickles.

What to know:

- Only ``general.architecture = llama`` is read (Llama 1-3.x, SmolLM, TinyLlama, ...); any other
  architecture is refused with an error that names it.
- The weights are stored dequantized in float32, 4 bytes per parameter (an 8B model: 32 GB of
  cache). Dequantizing does not undo quantization: the model is the quantized one, exactly.
- The tokenizer is the one ``transformers`` builds from the file's metadata (``AutoTokenizer``
  with ``gguf_file``), kept as it is. Where transformers has no pre-tokenizer split for the file's
  ``tokenizer.ggml.pre`` (SmolLM2's ``smollm`` for one) it uses GPT-2's, which drops steps of the
  original such as splitting digits one by one: ``"x  12"`` then becomes other tokens than the
  original tokenizer's. A warning says so; pass the original model's tokenizer folder where exact
  tokens matter (``tokenizer=...`` of herd.generate, herd.evaluate, herd.chat).
- Llama 3.1+ files carry their RoPE scaling as a ``rope_freqs.weight`` tensor, which transformers'
  loader ignores. herd recognises Llama 3's scaling in it and writes it into ``config.json``, so
  the directory has the original model's frequencies; a tensor herd cannot match is refused.
- The cache key is the sha256 of the file's size and of samples of its content (the first and last
  MiB and 62 pieces of 64 KiB spread over the file, about 6 MiB read), so resolving a big file a
  second time costs milliseconds. Conversion writes into a temporary folder in the cache that is
  renamed into place, under a lock, so concurrent processes (the ranks of one job) convert once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from herd.interop import hf
from herd.interop.modeldir import CONFIG_FILE, CheckpointError, process_umask, write_weights
from herd.paths import cache_dir

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'herd[gguf]'"
SOURCE_FILE = "gguf_source.json"  # in a converted directory: which file it came from
# Part of the cache key: a change in what a conversion writes gets a new directory.
CONVERSION_VERSION = 1
_SAMPLE_EDGE = 1 << 20  # bytes hashed at the start and at the end of the file
_SAMPLE_PIECE = 64 << 10  # bytes of each of the pieces hashed in between
_SAMPLE_PIECES = 62
# llama.cpp's defaults for Llama 3's RoPE scaling (convert_hf_to_gguf.py), used by Llama 3.1 to 3.3.
_LLAMA3_ROPE_SHAPES = ({"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},)


class GGUFError(CheckpointError):
    """A GGUF file that herd cannot read as a Llama model."""


class GGUFDependencyError(GGUFError, ImportError):
    """The ``gguf`` package is missing: an ImportError, and a GGUFError so that commands print one line."""


def is_gguf(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` names a GGUF file (by its ``.gguf`` suffix, any case) rather than a directory."""
    path = Path(location)
    return path.suffix.lower() == SUFFIX and not path.is_dir()


def model_dir(location: str | os.PathLike[str]) -> Path:
    """The model directory for ``location``: a ``.gguf`` file converted once (see the module docstring), or
    ``location`` itself.

    A missing file raises FileNotFoundError; a file that is not GGUF, a GGUF of another
    architecture than Llama or a missing ``gguf`` package raise a :class:`GGUFError` (a
    ValueError) whose one line says what to do.
    """
    path = Path(location).expanduser()
    if not is_gguf(path):
        return path
    check_file(path)
    key = fingerprint(path)
    root = cache_dir() / "gguf"
    target = root / key
    if (target / CONFIG_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{key}.lock"):
        if (target / CONFIG_FILE).is_file():  # another process converted it while this one waited
            return target
        if target.exists():  # not ours to trust: no config.json means it is not a finished conversion
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            convert(path, staging)
            os.chmod(staging, 0o777 & ~process_umask())  # mkdtemp's 0700 would hide it from the group
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / CONFIG_FILE).is_file():  # not a lost race (possible without fcntl): a real error
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("converted %s into %s (once: later runs reuse it)", path, target)
    return target


def check_file(path: str | os.PathLike[str]) -> Path:
    """``path`` when it is a readable file that starts with the GGUF magic; FileNotFoundError or GGUFError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with {MAGIC.decode()!r}); pass a .gguf "
                        "file written by llama.cpp, or a model directory")
    return path


def fingerprint(path: str | os.PathLike[str]) -> str:
    """The cache key of a file: sha256 of its size and of samples of its content (module docstring)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"herd-gguf-v{CONVERSION_VERSION} {size}\n".encode())
    if size <= 2 * _SAMPLE_EDGE + _SAMPLE_PIECES * _SAMPLE_PIECE:
        offsets = [(0, size)]
    else:
        middle = size - 2 * _SAMPLE_EDGE - _SAMPLE_PIECE
        offsets = [(0, _SAMPLE_EDGE), (size - _SAMPLE_EDGE, _SAMPLE_EDGE)]
        offsets += [(_SAMPLE_EDGE + middle * i // (_SAMPLE_PIECES - 1), _SAMPLE_PIECE) for i in range(_SAMPLE_PIECES)]
    with open(path, "rb") as f:
        for offset, length in offsets:
            f.seek(offset)
            digest.update(f.read(length))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- convert


def convert(gguf_file: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Write the Llama model of ``gguf_file`` as a Hugging Face directory in ``output``; returns ``output``.

    ``output`` holds ``config.json``, ``model.safetensors`` (float32), the tokenizer files,
    ``generation_config.json`` when the file names an end-of-sequence id, and ``gguf_source.json``
    (the file it came from). Use :func:`model_dir` to convert into herd's cache once per file.
    """
    path = check_file(gguf_file)
    _require_gguf_package()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    metadata = read_metadata(path)
    values = _read(load_gguf_checkpoint, str(path))["config"]
    if values.get("model_type") != "llama":  # transformers reads a llama file named "mistral" as Mistral
        raise GGUFError(f"{path}: general.architecture is {metadata['general.architecture']!r} but transformers "
                        f"reads it as {values.get('model_type')!r} (general.name {metadata.get('general.name')!r}); "
                        "herd loads Llama GGUF files only")
    hf_config = LlamaConfig(**{k: v for k, v in values.items() if k not in ("_model_name_or_path", "model_type")})
    hf_values = hf_config.to_dict()
    scaling = _rope_scaling(path, metadata, hf_config.head_dim, hf_config.rope_parameters["rope_theta"])
    if scaling is not None:
        hf_values["rope_parameters"] = {"rope_type": "llama3", "rope_theta": hf_config.rope_parameters["rope_theta"],
                                        **scaling}
    config = hf.config_from_hf(hf_values, str(path))

    with torch.device("meta"):  # only its parameter names are read: they map GGUF names to Hugging Face ones
        skeleton = LlamaForCausalLM(hf_config)
    tensors = _read(load_gguf_checkpoint, str(path), return_tensors=True, model_to_load=skeleton,
                    torch_dtype=torch.float32)["tensors"]
    state = _checked_state(tensors, config, path)

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_weights(state, output, max_shard_bytes=5 * 1024**3)
    tokenizer = _read(AutoTokenizer.from_pretrained, str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(output)
    _drop_invented_tokens(output / "tokenizer.json", metadata.get("token_count"), path)
    hf.check_tokenizer(output, config)
    _warn_about_pre_tokenizer(path, metadata)
    bos, eos = values.get("bos_token_id"), values.get("eos_token_id")
    hf.config_to_hf(config, dtype=torch.float32, bos_token_id=bos, eos_token_id=eos).save_pretrained(output)
    _write_generation_config(output, metadata, bos, eos)
    source = {"gguf_file": str(path.resolve()), "size": path.stat().st_size, "fingerprint": fingerprint(path),
              "general.name": metadata.get("general.name"), "tokenizer.ggml.pre": metadata.get("tokenizer.ggml.pre"),
              "rope_scaling_from_rope_freqs": scaling}
    (output / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return output


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays such as the vocabulary left out), with
    ``tensor_names`` and ``token_count`` (the vocabulary's size); refuses a file whose
    ``general.architecture`` is not ``llama``."""
    _require_gguf_package()
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError, struct.error, ... on damaged files
        raise GGUFError(f"{path} is not a readable GGUF file: {err}") from None
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != GGUFValueType.ARRAY:
            metadata[key] = field.contents()
    metadata["tensor_names"] = [tensor.name for tensor in reader.tensors]
    if "tokenizer.ggml.tokens" in reader.fields:
        metadata["token_count"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise GGUFError(f"{path}: general.architecture is {architecture!r}; herd loads Llama GGUF files "
                        "('llama') only")
    scaling_type = metadata.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise GGUFError(f"{path}: llama.rope.scaling.type is {scaling_type!r}; herd supports Llama 3's RoPE "
                        "scaling only (a rope_freqs.weight tensor)")
    return metadata


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFDependencyError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from None


def _read(function, *args, **kwargs):
    """A transformers GGUF reader, its errors as GGUFError naming the file (the first argument or gguf_file)."""
    try:
        return function(*args, **kwargs)
    except (ValueError, KeyError, NotImplementedError, OSError) as err:
        name = kwargs.get("gguf_file", args[0])
        raise GGUFError(f"transformers cannot read {name}: {type(err).__name__}: {err}") from None


def _checked_state(tensors: dict[str, torch.Tensor], config, path: Path) -> dict[str, torch.Tensor]:
    """The dequantized tensors under Hugging Face names, every one the model needs present with its shape."""
    from herd.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    expected = {hf.herd_to_hf_name(name): tuple(p.shape) for name, p in model.named_parameters()}
    if config.tie_embeddings:
        expected.pop(hf.herd_to_hf_name("output.weight"), None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFError(f"{path} lacks the tensor(s) {missing[:4]} (Hugging Face names) that its metadata implies")
    state = {}
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise GGUFError(f"{path}: {name} has shape {tuple(tensor.shape)}, the metadata implies {shape}")
        state[name] = tensor.contiguous()
    return state


def _rope_scaling(path: Path, metadata: dict[str, Any], head_dim: int, theta: float) -> dict[str, float] | None:
    """Llama 3's RoPE scaling parameters that the file's ``rope_freqs.weight`` holds, or None without one."""
    if "rope_freqs.weight" not in metadata["tensor_names"]:
        return None
    from gguf import GGUFReader

    from herd.model.config import RopeScaling
    from herd.model.rope import inverse_frequencies

    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    stored = torch.tensor(tensor.data, dtype=torch.float64).flatten()
    if stored.numel() != head_dim // 2:
        raise GGUFError(f"{path}: rope_freqs.weight has {stored.numel()} values, head_dim {head_dim} needs "
                        f"{head_dim // 2}")
    if torch.allclose(stored, torch.ones_like(stored)):
        return None
    plain = inverse_frequencies(head_dim, theta).double()
    for shape in _LLAMA3_ROPE_SHAPES:
        factor = _llama3_factor(plain, stored, **shape)
        if factor is None:
            continue
        scaling = {"factor": factor, **shape}
        scaled = inverse_frequencies(head_dim, theta, RopeScaling(**scaling)).double()
        if torch.allclose(plain / scaled, stored, rtol=1e-4, atol=0):
            return scaling
    raise GGUFError(f"{path}: rope_freqs.weight (factors {stored.min().item():.3g}..{stored.max().item():.3g}) is "
                    "not Llama 3's RoPE scaling with llama.cpp's defaults (low_freq_factor 1, high_freq_factor 4, "
                    "original context 8192); herd cannot load its frequencies")


def _drop_invented_tokens(tokenizer_file: Path, token_count: int | None, path: Path) -> None:
    """Remove the added tokens past the file's vocabulary that transformers invents.

    transformers builds a byte-level GGUF tokenizer as a GPT2Tokenizer, whose default
    ``<|endoftext|>`` is appended as a new special token when the vocabulary lacks it (Llama 3's
    does): an id with no embedding row, which herd would refuse. Only tokens past the file's
    ``token_count`` go; every token of the file keeps its id.
    """
    if token_count is None or not tokenizer_file.is_file():
        return
    content = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    added = content.get("added_tokens") or []
    invented = [token["content"] for token in added if token["id"] >= token_count]
    if not invented:
        return
    content["added_tokens"] = [token for token in added if token["id"] < token_count]
    tokenizer_file.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("%s: left out %s, which transformers adds past the file's %d tokens", path, invented, token_count)


def _llama3_factor(freqs: torch.Tensor, stored: torch.Tensor, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int) -> float | None:
    """Llama 3's ``factor`` that gives the ``stored`` per-frequency divisors, for the other parameters given.

    Frequencies below the band keep the factor itself; in the band llama.cpp stores
    ``1 / ((1 - smooth) / factor + smooth)``, solved here for the factor. None when no frequency tells.
    """
    wavelength = 2 * torch.pi / freqs
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    low = wavelength > original_max_position_embeddings / low_freq_factor
    band = ~low & (wavelength >= original_max_position_embeddings / high_freq_factor) & (smooth < 1 - 1e-6)
    estimates = torch.cat([stored[low], (1 - smooth[band]) / (1 / stored[band] - smooth[band])])
    estimates = estimates[torch.isfinite(estimates) & (estimates > 0)]
    return float(estimates.median()) if estimates.numel() else None


def _warn_about_pre_tokenizer(path: Path, metadata: dict[str, Any]) -> None:
    """Warn when transformers builds a byte-level tokenizer without the file's own pre-tokenizer split."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        return
    pre = metadata.get("tokenizer.ggml.pre")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # another transformers layout: it cannot be told, so say it may happen
        known = False
    else:
        known = pre in GGUF_PRE_TOKENIZER_SPLITS
    if not known:
        logger.warning(
            "%s: transformers has no pre-tokenizer split for tokenizer.ggml.pre=%r and uses GPT-2's, so some text "
            "(runs of digits, spaces) may become other tokens than with the original tokenizer; herd keeps "
            "transformers' tokenizer: pass the original model's tokenizer folder (tokenizer=...) where exact tokens "
            "matter", path, pre)


def _write_generation_config(output: Path, metadata: dict[str, Any], bos: int | None, eos: int | None) -> None:
    """``generation_config.json`` with the ids that end a turn (eos, and llama.cpp's eot/eom when named)."""
    ends = [eos, metadata.get("tokenizer.ggml.eot_token_id"), metadata.get("tokenizer.ggml.eom_token_id")]
    ends = list(dict.fromkeys(int(i) for i in ends if i is not None))
    if not ends:
        return
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos, eos_token_id=ends[0] if len(ends) == 1 else ends).save_pretrained(output)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_file`` (fcntl) for the block; no lock where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent conversions each write their own folder, one rename wins
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
