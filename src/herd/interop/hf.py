"""Read and write model directories in the Hugging Face Llama layout.

A directory holds ``config.json``, the weights as ``model.safetensors`` or as shards with
``model.safetensors.index.json``, and optionally the tokenizer files. Such a directory is what
every herd stage starts from and exports, and what ``transformers.AutoModelForCausalLM`` loads.
This module knows the Llama names and config; the files themselves are read and written by
:mod:`herd.interop.modeldir`. Llama 3.2 Vision directories are :mod:`herd.interop.mllama`'s.

A reward model is the same directory in the ``LlamaForSequenceClassification`` layout
(``architectures: ["LlamaForSequenceClassification"]``, ``num_labels: 1``): the backbone's
tensors, no ``lm_head``, and the value head as ``score.weight`` (1, hidden_size).
:func:`save_reward_model` writes one and :func:`load_reward_model` reads it back.

Only safetensors are read: pickled ``*.bin``/``*.pt`` weights are refused, never unpickled.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from herd.interop.modeldir import SAFETENSORS_FILE as SAFETENSORS_FILE  # file names: also hf.<name>
from herd.interop.modeldir import SAFETENSORS_INDEX as SAFETENSORS_INDEX
from herd.interop.modeldir import TOKENIZER_FILES as TOKENIZER_FILES
from herd.interop.modeldir import (
    CheckpointError,
    copy_tokenizer,
    end_of_text_id,
    iter_tensors,
    read_config_json,
    staged_directory,
    tokenizer_files,
    tokenizer_size,
    weight_files,
    write_weights,
)
from herd.model import ModelConfig, RewardModel, RopeScaling, Transformer
from herd.model.config import ROPE_TYPE_FIELDS

# herd parameter name <-> Hugging Face LlamaForCausalLM parameter name, within a block.
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HERD_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
# Stored tensors that are not weights (RoPE buffers some transformers versions save): skipped on load.
IGNORED_HF_TENSORS = re.compile(r"rotary_emb\.inv_freq$")


def herd_to_hf_name(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (biases alike)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _HERD_LAYER.match(name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    raise KeyError(f"herd parameter {name!r} has no Hugging Face Llama name")


def hf_to_herd_name(name: str) -> str | None:
    """The inverse of :func:`herd_to_hf_name`; None for a name herd does not know."""
    for herd_name, hf_name in _TOP_NAMES.items():
        if name == hf_name:
            return herd_name
    match = _HF_LAYER.match(name)
    if match:
        for herd_part, hf_part in LAYER_NAMES.items():
            if match.group(2) == hf_part:
                return f"layers.{match.group(1)}.{herd_part}.{match.group(3)}"
    return None


# ---------------------------------------------------------------------------------------- config


# The architectures whose config.json herd reads as its backbone (a reward model is the second);
# a config.json without ``architectures`` (a text_config, a hand-written one) is read as Llama too.
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification")
# Upper bounds on the sizes a config.json gives, checked before anything is built. Every real
# checkpoint is far below them; they stop a corrupt or hostile config.json from asking herd to
# build (or allocate) an absurd model.
SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 65536,
    "intermediate_size": 1_048_576,
    "vocab_size": 4_194_304,
    "max_position_embeddings": 1 << 30,
}
# The rope_parameters keys transformers requires for each rope_type (original_max_position_embeddings,
# where a type reads it, defaults to max_position_embeddings).
_HF_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
# transformers' LlamaConfig defaults for the keys a config.json may leave out.
_HF_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face Llama ``config.json`` mapping into a ModelConfig.

    Sizes are checked against :data:`SIZE_LIMITS` first, and whatever herd's backbone cannot
    compute as transformers' ``LlamaForCausalLM`` does (another architecture, a sliding window,
    another activation, partial rotary, an unknown ``rope_type``) is refused, each with a
    one-line CheckpointError naming the key. Keys left out take ``LlamaConfig``'s defaults.
    ``pretraining_tp`` is accepted and ignored, as transformers ignores it: it only says how the
    matmuls were split during pretraining.
    """
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source} must hold a JSON object (a Llama config), got {type(hf).__name__}")
    _check_architecture(hf, source)
    try:
        sizes = {key: _size(hf, key, source) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                          "intermediate_size", "vocab_size")}
        optional = {key: _size(hf, key, source, required=False)
                    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings")}
    except KeyError as err:
        raise CheckpointError(f"{source} lacks the key {err.args[0]!r} that a Llama config needs") from None
    _check_shape(sizes, optional, source)
    _check_representable(hf, source)
    max_positions = optional["max_position_embeddings"] or _HF_DEFAULTS["max_position_embeddings"]
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    try:
        theta, scaling = _rope_from_hf(hf, source, max_positions)
        return ModelConfig(
            dim=sizes["hidden_size"],
            n_layers=sizes["num_hidden_layers"],
            n_heads=sizes["num_attention_heads"],
            n_kv_heads=optional["num_key_value_heads"] or sizes["num_attention_heads"],
            head_dim=optional["head_dim"],
            vocab_size=sizes["vocab_size"],
            intermediate_size=sizes["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps") or _HF_DEFAULTS["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=max_positions,
            tie_embeddings=_flag(hf, "tie_word_embeddings", source),
            attention_bias=_flag(hf, "attention_bias", source),
            mlp_bias=_flag(hf, "mlp_bias", source),
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {str(err).replace('model.rope_scaling.', f'{rope_key}.')}") from None


def _check_shape(sizes: dict[str, int], optional: dict[str, int | None], source: str) -> None:
    """The relations between the sizes that herd's attention needs, named by their config.json keys."""
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    kv_heads, head_dim = optional["num_key_value_heads"] or heads, optional["head_dim"] or hidden // heads
    if hidden % heads:
        raise CheckpointError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % kv_heads:
        raise CheckpointError(f"{source}: num_attention_heads={heads} is not divisible by "
                              f"num_key_value_heads={kv_heads}")
    if head_dim % 2:
        raise CheckpointError(f"{source}: head_dim={head_dim} is odd; RoPE rotates pairs of dimensions")


def _check_architecture(hf: dict[str, Any], source: str) -> None:
    """Refuse a model_type or architectures entry other than Llama's."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; herd loads Llama checkpoints ('llama')"
        )
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or any(name not in LLAMA_ARCHITECTURES for name in architectures):
        raise CheckpointError(f"{source}: architectures {architectures!r} is not one herd loads; it reads "
                              f"{list(LLAMA_ARCHITECTURES)}")


def _size(hf: dict[str, Any], key: str, source: str, required: bool = True) -> int | None:
    """``hf[key]`` as a positive integer no larger than its :data:`SIZE_LIMITS` entry.

    A missing key raises KeyError when ``required``, else gives None (as does null).
    """
    value = hf[key] if required else hf.get(key)
    if value is None and not required:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    if value > SIZE_LIMITS[key]:
        raise CheckpointError(f"{source}: {key}={value} is above herd's limit of {SIZE_LIMITS[key]:,}, which no real "
                              "Llama checkpoint reaches; refusing it before building anything")
    return value


def _flag(hf: dict[str, Any], key: str, source: str) -> bool:
    """``hf[key]`` as a bool (absent or null: False)."""
    value = hf.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _check_representable(hf: dict[str, Any], source: str) -> None:
    """Refuse the Llama-config keys whose values herd's backbone cannot compute."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; herd's feed-forward is SwiGLU ('silu')")
    if hf.get("sliding_window") is not None:
        raise CheckpointError(f"{source}: sliding_window={hf['sliding_window']!r}; herd's attention is full causal "
                              "attention, without a sliding window")


def _rope_from_hf(hf: dict[str, Any], source: str, max_positions: int) -> tuple[float, RopeScaling | None]:
    """theta and the RopeScaling of a config.json (None: plain RoPE), as transformers reads them.

    transformers >= 5 keeps everything in ``rope_parameters``; 4.x used ``rope_theta`` +
    ``rope_scaling`` (with ``type`` for ``rope_type``). Keys a rope_type does not read are
    ignored, as transformers ignores them.
    """
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: {key} must be one mapping of RoPE settings (herd has no per-layer RoPE), "
                              f"got {params!r}")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or _HF_DEFAULTS["rope_theta"])
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise CheckpointError(f"{source}: partial_rotary_factor={partial!r}; herd rotates the whole head (1.0)")
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPE_FIELDS:
        raise CheckpointError(f"{source}: {key}.rope_type={kind!r} is not supported; herd implements "
                              f"{['default', *ROPE_TYPE_FIELDS]}")
    missing = [name for name in _HF_ROPE_REQUIRED[kind] if params.get(name) is None]
    if missing:
        raise CheckpointError(f"{source}: {key}.{missing[0]} is required by rope_type {kind!r}")
    values = {name: params[name] for name in ROPE_TYPE_FIELDS[kind] if params.get(name) is not None}
    if kind == "dynamic":  # transformers' dynamic NTK grows theta past max_position_embeddings
        values["original_max_position_embeddings"] = max_positions
    elif kind in ("llama3", "yarn", "longrope"):  # a top-level key wins, as in transformers (Phi-3 configs)
        original = hf.get("original_max_position_embeddings")
        if original is None:
            original = values.get("original_max_position_embeddings", max_positions)
        values["original_max_position_embeddings"] = original
    if kind == "longrope" and "factor" not in values:  # transformers' default: the context extension ratio
        values["factor"] = max_positions / values["original_max_position_embeddings"]
    try:
        return theta, RopeScaling(rope_type=kind, **values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {str(err).replace('model.rope_scaling.', f'{key}.')}") from None


def config_to_hf(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
):
    """A ``transformers.LlamaConfig`` describing the same model.

    ``rope_parameters`` holds the RoPE type and the fields it reads. For ``dynamic`` the
    original length is written as ``max_position_embeddings``, the length transformers grows
    theta past (so ``max_seq_len`` is not stored for such a model).
    """
    from transformers import LlamaConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    max_positions = config.max_seq_len
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling.to_dict(), "rope_theta": config.rope_theta}
        if config.rope_scaling.rope_type == "dynamic":
            max_positions = rope.pop("original_max_position_embeddings")
    hf = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
    )
    hf.architectures = ["LlamaForCausalLM"]
    hf.dtype = dtype
    return hf


# ------------------------------------------------------------------------------------------ load


SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden_dim",
                "tie_embeddings", "attention_bias", "mlp_bias")


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
) -> Transformer:
    """Read a Hugging Face Llama directory into a herd Transformer.

    ``dtype`` converts the weights (None keeps the stored dtype). The model is built on the meta
    device and the stored tensors are assigned, so nothing is allocated twice. ``config``, when
    given, must have the checkpoint's shape; its other fields (attention backend, context length,
    RoPE settings) replace the stored ones - that is how a stage extends a model's context.
    """
    path = Path(path)
    config = checked_override(read_config(path), config, path)
    check_tokenizer(path, config)
    files = weight_files(path)
    reward_model = is_reward_model(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights listed once
    state: dict[str, torch.Tensor] = {}
    for file, hf_name, tensor in iter_tensors(files, device):
        name = hf_to_herd_name(hf_name)
        if name is None:
            if IGNORED_HF_TENSORS.search(hf_name) or (reward_model and hf_name == REWARD_HEAD):
                continue
            raise CheckpointError(
                f"{file}: tensor {hf_name!r} is not part of a Llama model; remove it or "
                "convert the checkpoint"
            )
        if name == "output.weight" and config.tie_embeddings:
            continue  # some tied checkpoints store the head anyway; it is the embedding
        if name not in expected:
            raise CheckpointError(f"{file}: tensor {hf_name!r} does not fit config.json ({_unexpected(name, config)})")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{file}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {expected[name]}"
            )
        state[name] = tensor.to(dtype) if dtype is not None else tensor
    if reward_model and "output.weight" not in state and not config.tie_embeddings:
        # a reward model has no language-model head: the backbone's output layer holds zeros
        state["output.weight"] = torch.zeros(expected["output.weight"], dtype=dtype or torch.float32, device=device)
    missing = sorted(herd_to_hf_name(n) for n in expected if n not in state)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: the checkpoint is missing tensor(s) {shown}")
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope.to_empty(device=device)
    model.rope.reset_parameters()
    return model


def _unexpected(name: str, config: ModelConfig) -> str:
    """Why the model config.json describes has no parameter ``name``."""
    if name.endswith(".bias"):
        flag = "mlp_bias" if ".feed_forward." in name else "attention_bias"
        return f"{flag} is {str(getattr(config, flag)).lower()}, so the model has no such bias"
    return f"n_layers={config.n_layers}"


def checked_override(stored: ModelConfig, wanted: ModelConfig | None, path: Path) -> ModelConfig:
    """``wanted`` when it has ``stored``'s shape (:data:`SHAPE_FIELDS`), ``stored`` when it is None.

    A config of another shape raises CheckpointError naming each field that differs and ``path``.
    """
    if wanted is None:
        return stored
    differ = [
        f"{f}: checkpoint {getattr(stored, f)} vs config {getattr(wanted, f)}"
        for f in SHAPE_FIELDS
        if getattr(stored, f) != getattr(wanted, f)
    ]
    if differ:
        raise CheckpointError(
            f"{path} does not have the configured model shape ({'; '.join(differ)}); choose the "
            "model preset that matches the checkpoint, e.g. model=llama3_8b"
        )
    return wanted


REWARD_ARCHITECTURE = "LlamaForSequenceClassification"
REWARD_HEAD = "score.weight"


def is_reward_model(path: str | Path) -> bool:
    """True when ``path/config.json`` names the ``LlamaForSequenceClassification`` architecture."""
    config_file = Path(path) / "config.json"
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return REWARD_ARCHITECTURE in architectures


def load_reward_model(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> RewardModel:
    """Read a ``LlamaForSequenceClassification`` directory (num_labels 1) into a :class:`RewardModel`.

    The backbone is read as :func:`load` reads it; the value head is ``score.weight``. A directory
    of another architecture, with another number of labels or without the head is refused with a
    :class:`CheckpointError` that says so.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not is_reward_model(path):
        raise CheckpointError(f"{config_file} does not describe a reward model (architectures must include "
                              f"{REWARD_ARCHITECTURE!r}); train one with stage=reward, whose export is such a "
                              "directory")
    num_labels = _num_labels(json.loads(config_file.read_text()))
    if num_labels != 1:
        raise CheckpointError(f"{config_file}: a reward model has one output (num_labels 1), this one has "
                              f"{num_labels}")
    backbone = load(path, dtype=dtype, device=device)
    head = read_reward_head(path, backbone.config.dim, device)
    model = RewardModel(backbone)
    model.head.weight.data = head.to(dtype) if dtype is not None else head
    return model


def read_reward_head(path: str | Path, dim: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The value head (``score.weight``, shape (1, dim)) of a reward-model directory."""
    found = next(((file, tensor) for file, name, tensor in iter_tensors(weight_files(Path(path)), device)
                  if name == REWARD_HEAD), None)
    if found is None:
        raise CheckpointError(f"{path}: no {REWARD_HEAD} tensor, so the reward head is missing")
    file, head = found
    if tuple(head.shape) != (1, dim):
        raise CheckpointError(f"{file}: {REWARD_HEAD} has shape {tuple(head.shape)}, expected (1, {dim})")
    return head


def _num_labels(hf: dict[str, Any]) -> int:
    if "num_labels" in hf:
        return int(hf["num_labels"])
    return len(hf.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})  # transformers' default is 2


def read_config(path: Path) -> ModelConfig:
    """The ModelConfig of a model directory, with errors that name the file."""
    return config_from_hf(read_config_json(path), str(Path(path) / "config.json"))


def check_tokenizer(path: Path, config: ModelConfig) -> None:
    """Refuse a tokenizer whose ids do not fit the checkpoint's embedding rows."""
    tokenizer_file = Path(path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return
    size = tokenizer_size(tokenizer_file)
    if size > config.vocab_size:
        raise CheckpointError(
            f"{tokenizer_file} has {size} tokens but config.json's vocab_size is {config.vocab_size}: the "
            "tokenizer does not belong to this checkpoint; use the tokenizer the model was trained with"
        )


# ------------------------------------------------------------------------------------------ save


def save(
    model: Transformer,
    path: str | Path,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face Llama directory that ``transformers`` loads.

    ``tokenizer`` is a tokenizer directory to copy, or an object with ``save_pretrained(path)`` or
    ``save(path)``. A tokenizer with more ids than the model's ``vocab_size`` is refused with a
    :class:`CheckpointError` before anything is written. A tokenizer directory without
    ``tokenizer_config.json`` gets herd's (bos ``<|begin_of_text|>``, eos ``<|end_of_text|>``),
    so that config.json and ``transformers.AutoTokenizer`` know bos/eos. ``dtype`` converts on
    the way out (default: the model's dtype). Weights above ``max_shard_bytes`` are split into
    shards with an index. ``state_dict`` replaces the model's own (a sharded model's gathered
    full state, or averaged weights). Every file gets the mode the process's umask gives.
    """
    return _write_directory(model.config, hf_state_dict(model, dtype, state_dict), Path(path), tokenizer,
                            max_shard_bytes)


def save_reward_model(
    model: Transformer,
    head_weight: torch.Tensor,
    path: str | Path,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write backbone + value head as a ``LlamaForSequenceClassification`` directory (num_labels 1).

    ``head_weight`` (1, dim) becomes ``score.weight``; the language-model head is left out. The
    config's ``pad_token_id`` is the tokenizer's end-of-text id (or its eos), so ``transformers``
    reads the reward at each row's last token that is not padding. Other arguments as :func:`save`.
    """
    state = hf_state_dict(model, dtype, state_dict)
    state.pop(_TOP_NAMES["output.weight"], None)
    out_dtype = next(iter(state.values())).dtype
    state[REWARD_HEAD] = head_weight.detach().to("cpu", dtype=dtype or out_dtype).reshape(1, -1).contiguous()
    return _write_directory(model.config, state, Path(path), tokenizer, max_shard_bytes, reward=True)


def _write_directory(
    config: ModelConfig, state: dict[str, torch.Tensor], path: Path, tokenizer: Any, max_shard_bytes: int,
    reward: bool = False,
) -> Path:
    """Weights (HF names), tokenizer and config.json into ``path`` (through :func:`staged_directory`); the
    tokenizer is checked first."""
    out_dtype = next(iter(state.values())).dtype
    bos, eos = None, None
    with tempfile.TemporaryDirectory(prefix="herd-tokenizer-") as staging:
        if tokenizer is not None:  # checked before anything is written into path
            source, files = tokenizer_files(tokenizer, Path(staging))
            _check_tokenizer_fits(source, config, tokenizer)
        with staged_directory(path) as out:
            write_weights(state, out, max_shard_bytes)
            if tokenizer is not None:
                bos, eos = copy_tokenizer(source, files, out)
            hf_config = config_to_hf(config, dtype=out_dtype, bos_token_id=bos, eos_token_id=eos)
            if reward:
                hf_config.architectures = [REWARD_ARCHITECTURE]
                hf_config.num_labels = 1
                end_of_text = end_of_text_id(out)
                hf_config.pad_token_id = end_of_text if end_of_text is not None else eos
            hf_config.save_pretrained(out)
    return path


# Prefixes that wrappers (activation checkpointing, torch.compile) add to parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def hf_state_dict(
    model: Transformer, dtype: torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Model weights under Hugging Face names (the tied head is stored once, as the embedding)."""
    state = {}
    for name, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        if name == "output.weight" and model.config.tie_embeddings:
            continue
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
        state[herd_to_hf_name(name)] = tensor
    return state


def _check_tokenizer_fits(source: Path, config: ModelConfig, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding rows."""
    tokenizer_file = source / "tokenizer.json"
    if not tokenizer_file.is_file():
        return  # no fast tokenizer (e.g. only vocabulary files): nothing herd can count
    size = tokenizer_size(tokenizer_file)
    if size > config.vocab_size:
        name = f"tokenizer {source}" if isinstance(tokenizer, str | Path) else f"the {type(tokenizer).__name__}"
        raise CheckpointError(
            f"{name} has {size} ids but the model's vocab_size is {config.vocab_size}, so ids "
            f"{config.vocab_size}-{size - 1} have no embedding row: export with the tokenizer the model "
            f"was trained with, or train a model whose vocab_size is at least {size}"
        )
