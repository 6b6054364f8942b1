"""Read and write Llama 3.2 Vision directories (``MllamaForConditionalGeneration``) as herd vision models.

Such a directory has a ``config.json`` with ``model_type: mllama``. Its ``text_config`` and
``vision_config`` describe the two halves. The weights are safetensors, and the tokenizer has
``<|image|>``. :func:`load_vision` reads one into a :class:`~herd.model.vision.VisionLanguageModel`;
:func:`save_vision` writes one that ``transformers`` loads. The names are mapped explicitly,
never guessed:

- ``transformers`` interleaves the text model's cross-attention layers with its self-attention
  layers in one list. The layers named in ``text_config.cross_attention_layers`` are
  cross-attention; the others, in order, are the backbone's blocks. A cross-attention layer at
  list index i, with c cross-attention layers before it, runs before backbone block i - c (after
  the last block when that is the number of blocks).
- The text embedding has ``vocab_size + 8`` rows: the backbone's ``tok_embeddings``, then the
  adapter's ``extra_embeddings``. ``image_token_index`` must be ``vocab_size``, the first new row.
- The head (``lm_head``) has ``vocab_size`` rows and is stored even for a backbone with tied
  embeddings; loading ties it again when it equals the embedding's first rows.
- The vision model's and the projector's names are the same as herd's under ``encoder.`` and
  ``projection.``.

The weights are written with the names ``transformers`` writes (``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_model.*``, ``multi_modal_projector.*``), and read
with those or with the ``model.``-prefixed names of its in-memory layout.

``pad_to_max_tiles`` (see :mod:`herd.model.vision`) is kept in ``vision_config`` as
``herd_pad_to_max_tiles``. A directory without it, Meta's own for instance, was trained with
padded tiles, and loads with ``pad_to_max_tiles=True``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from herd.interop import hf, modeldir
from herd.interop.modeldir import CheckpointError
from herd.model import ModelConfig, Transformer
from herd.model.vision import NEW_TOKENS, VisionConfig, VisionLanguageModel

ARCHITECTURE = "MllamaForConditionalGeneration"
IMAGE_TOKEN = "<|image|>"
PREPROCESSOR_FILE = "preprocessor_config.json"
PAD_TO_MAX_TILES_KEY = "herd_pad_to_max_tiles"

# Prefixes of the saved (Hub) layout and of transformers' in-memory layout.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
_VISION_PREFIXES = ("vision_model.", "model.vision_model.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
_CROSS_NAMES = {
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "cross_attn_attn_gate": "attention_gate",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "cross_attn_mlp_gate": "ffn_gate",
}
_SELF_NAMES = {f"{hf_name}.weight": f"{herd_name}.weight" for herd_name, hf_name in hf.LAYER_NAMES.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_vision_model(path: str | Path) -> bool:
    """True when ``path/config.json`` describes an Mllama model (``model_type: mllama``)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "mllama"
    except (OSError, ValueError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------ config


def read_configs(path: str | Path) -> tuple[ModelConfig, VisionConfig]:
    """The backbone's ModelConfig and the VisionConfig of an Mllama directory, errors naming the file."""
    return configs_from_hf(modeldir.read_config_json(path), str(Path(path) / modeldir.CONFIG_FILE))


def configs_from_hf(data: dict[str, Any], source: str = "config.json") -> tuple[ModelConfig, VisionConfig]:
    """Translate an Mllama ``config.json`` mapping into (backbone ModelConfig, VisionConfig)."""
    if data.get("model_type") != "mllama":
        raise CheckpointError(f"{source}: model_type is {data.get('model_type')!r}; a Llama 3.2 Vision directory "
                              "has 'mllama'")
    text, vision = data.get("text_config") or {}, data.get("vision_config") or {}
    try:
        cross = [int(i) for i in text.get("cross_attention_layers") or []]
        total = int(text["num_hidden_layers"])
        backbone = hf.config_from_hf({**text, "model_type": "llama", "num_hidden_layers": total - len(cross),
                                      "tie_word_embeddings": False}, source)
        positions = _positions(cross, total, source)
        image_token = int(data.get("image_token_index", backbone.vocab_size))
        if image_token != backbone.vocab_size:
            raise CheckpointError(f"{source}: image_token_index is {image_token}; herd reads the Llama 3.2 Vision "
                                  f"layout, where it is text_config.vocab_size ({backbone.vocab_size})")
        if vision.get("hidden_act", "gelu") != "gelu" or int(vision.get("num_channels", 3)) != 3:
            raise CheckpointError(f"{source}: the vision model must use gelu and 3 channels, as Llama 3.2 Vision does")
        config = VisionConfig(
            image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
            dim=int(vision["hidden_size"]), n_layers=int(vision["num_hidden_layers"]),
            n_global_layers=int(vision["num_global_layers"]),
            n_heads=int(vision.get("attention_heads", vision.get("num_attention_heads", 16))),
            ffn_dim=int(vision["intermediate_size"]),
            feature_layers=tuple(int(i) for i in vision["intermediate_layers_indices"]),
            max_num_tiles=int(vision["max_num_tiles"]), norm_eps=float(vision.get("norm_eps", 1e-5)),
            cross_attention_layers=positions, pad_to_max_tiles=bool(vision.get(PAD_TO_MAX_TILES_KEY, True)),
        )
    except KeyError as err:
        raise CheckpointError(f"{source} lacks the key {err.args[0]!r} that an Mllama config needs") from None
    except ValueError as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {err}") from None
    expected_output = int(vision.get("vision_output_dim", config.output_dim))
    if expected_output != config.output_dim:
        raise CheckpointError(f"{source}: vision_output_dim is {expected_output}, but hidden_size x (1 + "
                              f"len(intermediate_layers_indices)) is {config.output_dim}")
    ratios = vision.get("supported_aspect_ratios")
    if ratios is not None and len(ratios) != len(config.aspect_ratios):
        raise CheckpointError(f"{source}: {len(ratios)} supported_aspect_ratios; max_num_tiles={config.max_num_tiles} "
                              f"gives {len(config.aspect_ratios)} (every a x b tiles with a * b <= max_num_tiles)")
    return backbone, config


def _positions(cross: list[int], total: int, source: str) -> tuple[int, ...]:
    """Backbone blocks the cross layers run before, from their indices in the interleaved list."""
    if cross != sorted(set(cross)) or any(not 0 <= i < total for i in cross):
        raise CheckpointError(f"{source}: cross_attention_layers {cross} must be increasing indices below "
                              f"num_hidden_layers={total}")
    return tuple(index - count for count, index in enumerate(cross))  # n_self: after the last block


def configs_to_hf(model: VisionLanguageModel, *, dtype: torch.dtype, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None):
    """A ``transformers.MllamaConfig`` describing ``model``."""
    from transformers import MllamaConfig

    backbone, vision = model.config, model.vision_config
    text = hf.config_to_hf(backbone, dtype=dtype).to_dict()
    positions = model.cross_positions
    cross = [block + count for count, block in enumerate(positions)]
    text_config = {
        "vocab_size": backbone.vocab_size, "hidden_size": backbone.dim, "intermediate_size": backbone.ffn_hidden_dim,
        "num_hidden_layers": backbone.n_layers + len(positions), "num_attention_heads": backbone.n_heads,
        "num_key_value_heads": backbone.n_kv_heads, "rms_norm_eps": backbone.norm_eps,
        "max_position_embeddings": backbone.max_seq_len, "rope_parameters": text["rope_parameters"],
        "cross_attention_layers": cross, "tie_word_embeddings": False, "hidden_act": "silu",
    }
    # Without a tokenizer bos/eos keep transformers' defaults (Llama 3's ids; it must have an int
    # there); the padding id indexes the embedding, so it is left unset.
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    text_config.update({key: value for key, value in ids.items() if value is not None})
    text_config["pad_token_id"] = pad_token_id
    vision_config = {
        "hidden_size": vision.dim, "num_hidden_layers": vision.n_layers, "num_global_layers": vision.n_global_layers,
        "attention_heads": vision.n_heads, "intermediate_size": vision.ffn_dim, "image_size": vision.image_size,
        "patch_size": vision.patch_size, "norm_eps": vision.norm_eps, "max_num_tiles": vision.max_num_tiles,
        "intermediate_layers_indices": list(vision.feature_layers), "vision_output_dim": vision.output_dim,
        "supported_aspect_ratios": [list(r) for r in vision.aspect_ratios], "hidden_act": "gelu",
        "num_channels": 3, PAD_TO_MAX_TILES_KEY: vision.pad_to_max_tiles,
    }
    config = MllamaConfig(text_config=text_config, vision_config=vision_config,
                          image_token_index=model.image_token_id)
    config.architectures = [ARCHITECTURE]
    config.dtype = dtype
    return config


# -------------------------------------------------------------------------------------------- names


def hf_to_herd_name(name: str, cross_layers: set[int], self_index: dict[int, int], cross_index: dict[int, int]
                    ) -> str | None:
    """The herd parameter name of an Mllama tensor name (None for a name herd does not know).

    The text embedding maps to ``backbone.tok_embeddings.weight`` here; :func:`load_vision`
    splits off its last 8 rows.
    """
    if name in _HEAD_NAMES:
        return "backbone.output.weight"
    for prefix in _VISION_PREFIXES:
        if name.startswith(prefix):
            return "encoder." + name[len(prefix):]
    for prefix in _PROJECTOR_PREFIXES:
        if name.startswith(prefix):
            return "projection." + name[len(prefix):]
    for prefix in _TEXT_PREFIXES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if rest == "embed_tokens.weight":
            return "backbone.tok_embeddings.weight"
        if rest == "norm.weight":
            return "backbone.norm.weight"
        match = _LAYER.match(rest)
        if match:
            index, part = int(match.group(1)), match.group(2)
            if index in cross_layers and part in _CROSS_NAMES:
                return f"cross_layers.{cross_index[index]}.{_CROSS_NAMES[part]}"
            if index in self_index and part in _SELF_NAMES:
                return f"backbone.layers.{self_index[index]}.{_SELF_NAMES[part]}"
    return None


def _layer_indices(model: VisionLanguageModel) -> tuple[set[int], dict[int, int], dict[int, int]]:
    """The interleaved list's cross indices, and its self/cross index -> herd block/cross layer number."""
    cross = {block + count: count for count, block in enumerate(model.cross_positions)}
    total = model.config.n_layers + len(cross)
    self_layers = [i for i in range(total) if i not in cross]
    return set(cross), {i: n for n, i in enumerate(self_layers)}, cross


def herd_to_hf_state(model: VisionLanguageModel, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                     ) -> dict[str, torch.Tensor]:
    """``state`` (herd names, e.g. ``model.state_dict()``) under the saved Mllama names."""
    cross, self_index, cross_index = _layer_indices(model)
    to_hf = {hf_to_herd_name(f"language_model.model.layers.{i}.{part}", cross, self_index, cross_index):
             f"language_model.model.layers.{i}.{part}"
             for i in range(model.config.n_layers + len(cross))
             for part in (_CROSS_NAMES if i in cross else _SELF_NAMES)}
    state = {_strip_wrappers(name): tensor for name, tensor in state.items()}
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        out[name] = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()

    put("language_model.model.embed_tokens.weight",
        torch.cat([state.pop("backbone.tok_embeddings.weight"), state.pop("extra_embeddings.weight")]))
    head = state.pop("backbone.output.weight", None)
    put("language_model.lm_head.weight", head if head is not None else out["language_model.model.embed_tokens.weight"]
        [: model.config.vocab_size])
    put("language_model.model.norm.weight", state.pop("backbone.norm.weight"))
    for name, tensor in state.items():
        if name.startswith("encoder."):
            put("vision_model." + name[len("encoder."):], tensor)
        elif name.startswith("projection."):
            put("multi_modal_projector." + name[len("projection."):], tensor)
        elif name in to_hf:
            put(to_hf[name], tensor)
        elif not name.startswith("backbone.rope."):
            raise KeyError(f"herd parameter {name!r} has no Mllama name")
    return out


def _strip_wrappers(name: str) -> str:
    for prefix in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


# -------------------------------------------------------------------------------------------- load


def load_vision(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
) -> VisionLanguageModel:
    """Read an ``MllamaForConditionalGeneration`` directory into a :class:`VisionLanguageModel`.

    ``dtype`` converts the weights (None keeps the stored dtype). ``config``, when given, must
    have the backbone's shape; its context fields replace the stored ones (as :func:`herd.interop.hf.load`).
    The backbone has tied embeddings when the stored head equals the embedding's first rows. A
    tensor herd does not know, a missing tensor or a wrong shape raises :class:`CheckpointError`
    naming it.
    """
    path = Path(path)
    stored, vision_config = read_configs(path)
    vision_config = read_preprocessor(path, vision_config)
    if config is not None:
        stored = hf.checked_override(stored, dataclasses.replace(config, tie_embeddings=False), path)
    _check_tokenizer(path, stored)
    with torch.device("meta"):
        model = VisionLanguageModel(Transformer(stored), vision_config)
    state = _read_state(path, model, dtype, device)
    vocab = stored.vocab_size
    embedding = state.pop("backbone.tok_embeddings.weight")
    state["backbone.tok_embeddings.weight"], state["extra_embeddings.weight"] = embedding[:vocab], embedding[vocab:]
    if torch.equal(state["backbone.output.weight"], state["backbone.tok_embeddings.weight"]):
        # written from a backbone with tied embeddings: tie them again
        with torch.device("meta"):
            model = VisionLanguageModel(Transformer(dataclasses.replace(stored, tie_embeddings=True)), vision_config)
        state["backbone.output.weight"] = state["backbone.tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        model.backbone.output.weight = model.backbone.tok_embeddings.weight
    model.backbone.rope.to_empty(device=device)
    model.backbone.rope.reset_parameters()
    return model


def _read_state(path: Path, model: VisionLanguageModel, dtype: torch.dtype | None, device
                ) -> dict[str, torch.Tensor]:
    """Every tensor of the directory under its herd name (the whole text embedding as tok_embeddings), checked."""
    config = model.config
    cross, self_index, cross_index = _layer_indices(model)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    expected["backbone.tok_embeddings.weight"] = (config.vocab_size + NEW_TOKENS, config.dim)
    expected.pop("extra_embeddings.weight")
    state: dict[str, torch.Tensor] = {}
    for file, hf_name, tensor in modeldir.iter_tensors(modeldir.weight_files(path), device):
        name = hf_to_herd_name(hf_name, cross, self_index, cross_index)
        if name is None:
            if hf.IGNORED_HF_TENSORS.search(hf_name):
                continue
            raise CheckpointError(f"{file}: tensor {hf_name!r} is not part of a Llama 3.2 Vision model; remove it "
                                  "or convert the checkpoint")
        if name not in expected:
            raise CheckpointError(f"{file}: tensor {hf_name!r} does not fit config.json")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{file}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{expected[name]}")
        state[name] = tensor.to(dtype) if dtype is not None else tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: the checkpoint is missing the tensor(s) for {shown}")
    return state


def _check_tokenizer(path: Path, config: ModelConfig) -> None:
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file() and modeldir.tokenizer_size(tokenizer_file) > config.vocab_size + NEW_TOKENS:
        raise CheckpointError(f"{tokenizer_file} has {modeldir.tokenizer_size(tokenizer_file)} tokens, more than the "
                              f"{config.vocab_size + NEW_TOKENS} text embedding rows: it does not belong to this model")


# -------------------------------------------------------------------------------------------- save


def save_vision(
    model: VisionLanguageModel,
    path: str | Path,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as an ``MllamaForConditionalGeneration`` directory that ``transformers`` loads.

    ``tokenizer`` is a tokenizer directory (or an object with ``save_pretrained``/``save``). Its
    copy gets ``<|image|>`` as the id ``vocab_size`` when it lacks it, so ``MllamaProcessor``
    finds it; a tokenizer with more ids than the embedding rows, or whose ``<|image|>`` has
    another id, is refused before anything is written. ``preprocessor_config.json`` records the
    tiling and pixel statistics. ``state_dict`` (herd names) replaces the model's own, e.g. a
    sharded model's gathered state. Other arguments as :func:`herd.interop.hf.save`.
    """
    path = Path(path)
    state = herd_to_hf_state(model, state_dict if state_dict is not None else model.state_dict(), dtype)
    out_dtype = state["language_model.lm_head.weight"].dtype
    ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
    with tempfile.TemporaryDirectory(prefix="herd-tokenizer-") as staging:
        staged = None
        if tokenizer is not None:
            source, files = modeldir.tokenizer_files(tokenizer, Path(staging) / "source")
            staged = _tokenizer_with_image_token(source, files, Path(staging) / "out", model.config.vocab_size)
        with modeldir.staged_directory(path) as out:
            modeldir.write_weights(state, out, max_shard_bytes)
            if staged is not None:
                ids["bos"], ids["eos"] = modeldir.copy_tokenizer(staged, sorted(staged.iterdir()), out)
                ids["pad"] = modeldir.end_of_text_id(out)
            config = configs_to_hf(model, dtype=out_dtype, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                   pad_token_id=ids["pad"])
            config.save_pretrained(out)
            _write_preprocessor_config(model.vision_config, out)
    return path


def _tokenizer_with_image_token(source: Path, files: list[Path], staging: Path, vocab_size: int) -> Path:
    """A copy of the tokenizer files in ``staging`` whose tokenizer.json has ``<|image|>`` = ``vocab_size``."""
    from tokenizers import AddedToken, Tokenizer

    staging.mkdir(parents=True)
    for file in files:
        shutil.copyfile(file, staging / file.name)
    tokenizer_file = staging / "tokenizer.json"
    if not tokenizer_file.is_file():
        return staging
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if image_id is None:
        if size != vocab_size:
            raise CheckpointError(f"tokenizer {source} has {size} ids and no {IMAGE_TOKEN}; it must have exactly the "
                                  f"model's vocab_size ({vocab_size}) ids so that {IMAGE_TOKEN} gets id {vocab_size}")
        tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        tokenizer.save(str(tokenizer_file))
    if image_id != vocab_size or tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size + NEW_TOKENS:
        raise CheckpointError(f"tokenizer {source}: {IMAGE_TOKEN} has id {image_id} and there are "
                              f"{tokenizer.get_vocab_size(with_added_tokens=True)} ids; an Mllama tokenizer has "
                              f"{IMAGE_TOKEN} = vocab_size ({vocab_size}) and at most {vocab_size + NEW_TOKENS} ids")
    return staging


def _write_preprocessor_config(vision: VisionConfig, path: Path) -> None:
    """Llama 3.2 Vision's image-processor settings for this model's tiles."""
    processor = {
        "image_processor_type": "MllamaImageProcessor",
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
        "max_image_tiles": vision.max_num_tiles, "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": vision.image_size, "width": vision.image_size},
    }
    (path / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")


def read_preprocessor(path: str | Path, vision: VisionConfig) -> VisionConfig:
    """``vision`` with the pixel statistics of ``path/preprocessor_config.json`` (if there is one)."""
    file = Path(path) / PREPROCESSOR_FILE
    if not file.is_file():
        return vision
    data = json.loads(file.read_text())
    size = (data.get("size") or {}).get("height", vision.image_size)
    if int(size) != vision.image_size or int(data.get("max_image_tiles", vision.max_num_tiles)) != vision.max_num_tiles:
        raise CheckpointError(f"{file}: tile size {size} / max_image_tiles {data.get('max_image_tiles')} disagree with "
                              f"config.json's image_size {vision.image_size} / max_num_tiles {vision.max_num_tiles}")
    return dataclasses.replace(vision, image_mean=tuple(data.get("image_mean", vision.image_mean)),
                               image_std=tuple(data.get("image_std", vision.image_std)))
