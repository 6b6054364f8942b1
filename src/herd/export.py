"""Turn a training checkpoint (or a llama.cpp GGUF file) into a Hugging Face Llama directory.

Works on both kinds of checkpoint Lightning writes:
- a file (single device, DDP): loaded with ``torch.load(weights_only=True)``;
- a folder of shards (strategy=fsdp2 / fsdp2_tp, torch.distributed.checkpoint): only the model's
  tensors are read, in one process, whatever the number of ranks that wrote it.

and a ``.gguf`` file, dequantized (:mod:`herd.interop.gguf`), with the tokenizer built from it
unless ``tokenizer=`` names another:

    python -m herd.export checkpoint=logs/pretrain/runs/<run>/checkpoints/last.ckpt output=exports/step-1000 \\
        tokenizer=data/prepared/stdlib/tokenizer
    python -m herd.export checkpoint=SmolLM2-135M-Instruct.Q4_1.gguf output=exports/smollm2 dtype=bf16

Nothing in a checkpoint runs code while it is read: files and ``meta.pt`` load with
``weights_only=True``, and a folder's ``.metadata`` (a pickle) goes through herd's restricted
unpickler (see ``herd.stages.checkpoint_io``), so a crafted folder is refused with an error that
names the file instead of being trusted. herd reads folders it did not write rather than refusing
them: a folder carries no signature to tell them apart, and the restricted reader makes that safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from herd.cli import user_errors
from herd.dtypes import FP32_BF16_OR_NULL, torch_dtype
from herd.interop import gguf, hf
from herd.model import ModelConfig, Transformer
from herd.presets import config_dir
from herd.stages import checkpoint_io
from herd.stages.reward import VALUE_HEAD_KEY

MODEL_PREFIX = "model."


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and the model's weights (herd names) of a Lightning checkpoint file or folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        meta, weights = _read_sharded(path)
    else:
        checkpoint = checkpoint_io.load_checkpoint_file(path)
        meta, weights = checkpoint, checkpoint.get("state_dict", {})
    herd = meta.get("herd")
    if not isinstance(herd, dict) or not isinstance(herd.get("model_config"), dict):
        raise ValueError(f"{path} is not a herd checkpoint (no model config in it); export it with the code that "
                         "wrote it")
    try:
        config = ModelConfig.from_dict(herd["model_config"])
    except (TypeError, KeyError) as err:
        raise ValueError(f"{path} holds a model config herd cannot read ({type(err).__name__}: {err}); export it "
                         "with the code that wrote it") from None
    if not isinstance(weights, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (its state_dict is a {type(weights).__name__})")
    state = {k[len(MODEL_PREFIX):]: v for k, v in weights.items()
             if isinstance(k, str) and k.startswith(MODEL_PREFIX) and isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{path} holds no model weights (keys starting with {MODEL_PREFIX!r})")
    if VALUE_HEAD_KEY in weights:  # a reward model's head travels with the backbone
        state[VALUE_HEAD_KEY] = weights[VALUE_HEAD_KEY]
    return config, state


def _read_sharded(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """meta.pt and the model's tensors of a sharded checkpoint, read without a full unpickler."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta_file = path / checkpoint_io.SHARDED_META
    if not meta_file.is_file():
        raise ValueError(f"{path} is a folder but not a sharded Lightning checkpoint (no {meta_file.name})")
    index = checkpoint_io.check_dcp_metadata(path)  # refuses a crafted .metadata before anything else reads it
    meta = checkpoint_io.load_checkpoint_file(meta_file)
    wanted = {}
    for key, item in index.state_dict_metadata.items():
        wanted_key = key.startswith("state_dict." + MODEL_PREFIX) or key == "state_dict." + VALUE_HEAD_KEY
        if wanted_key and isinstance(item, TensorStorageMetadata):
            wanted[key] = torch.empty(item.size, dtype=item.properties.dtype)
    checkpoint_io.load_sharded(wanted, path)
    return meta, {k[len("state_dict."):]: v for k, v in wanted.items()}


def export(checkpoint: str | Path, output: str | Path, tokenizer: str | None = None, dtype: str | None = None) -> Path:
    """Write the checkpoint's model as a Hugging Face directory; returns the directory.

    A reward model's checkpoint (stage=reward) becomes a ``LlamaForSequenceClassification``
    directory with its value head; any other a ``LlamaForCausalLM`` directory. A ``.gguf`` file's
    model is read through its converted directory (:func:`herd.interop.gguf.model_dir`), with that
    directory's tokenizer unless ``tokenizer`` is given.
    """
    out_dtype = torch_dtype(dtype, FP32_BF16_OR_NULL, hint="use fp32, bf16 or null (as trained; fp32 for a GGUF file)")
    if gguf.is_gguf(checkpoint):
        directory = gguf.model_dir(checkpoint)
        model = hf.load(directory, dtype=out_dtype or torch.float32)
        return hf.save(model, output, tokenizer=tokenizer or directory, dtype=out_dtype)
    config, state = read_checkpoint(checkpoint)
    head = state.pop(VALUE_HEAD_KEY, None)
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{checkpoint} lacks model tensors {missing[:8]}")
    if head is not None:
        return hf.save_reward_model(model, head, output, tokenizer=tokenizer, dtype=out_dtype, state_dict=state)
    return hf.save(model, output, tokenizer=tokenizer, dtype=out_dtype, state_dict=state)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    """Command-line entry; errors name the file and exit with status 2."""
    with user_errors("herd.export", (FileNotFoundError, ValueError)):
        out = export(cfg.checkpoint, cfg.output, cfg.tokenizer, cfg.dtype)
    print(f"herd.export: wrote {out}")


if __name__ == "__main__":
    main()
