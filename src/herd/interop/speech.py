"""Read and write speech models: a Hugging Face Llama directory with the speech adapter beside it.

The directory is the frozen language model as any Llama directory (``config.json``,
``model.safetensors``, tokenizer), so ``transformers`` loads the LM from it as it is, plus two
files of herd's own:

- ``speech_adapter.safetensors``: the encoder's and the adapter's weights, under herd's names
  (``encoder.*``, ``adapter.*``);
- ``speech_adapter.json``: ``{"format": "herd.speech/1", "speech": <SpeechConfig>, "features":
  {...}, "special_tokens": {...}}``. ``features`` records how the log-mel features were computed
  (``WhisperFeatureExtractor``, 80 bins, 16 kHz, 10 ms hop); ``special_tokens`` the two tokens
  that enclose the speech positions.

:func:`save_speech` writes one; :func:`load_speech` reads one into a
:class:`~herd.model.speech.SpeechLanguageModel`; :func:`is_speech_model` tells one apart from a
plain Llama directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from herd.interop import hf, modeldir
from herd.interop.modeldir import CheckpointError
from herd.model.config import ModelConfig
from herd.model.speech import SpeechConfig, SpeechLanguageModel

ADAPTER_WEIGHTS = "speech_adapter.safetensors"
ADAPTER_CONFIG = "speech_adapter.json"
FORMAT = "herd.speech/1"
SPEECH_TOKENS = {"speech_start": "<|reserved_special_token_10|>", "speech_end": "<|reserved_special_token_11|>"}
FEATURES = {"extractor": "transformers.WhisperFeatureExtractor", "n_mels": 80, "sampling_rate": 16000,
            "hop_length": 160}


def is_speech_model(path: str | Path) -> bool:
    """Whether ``path`` is a speech model directory (it has ``speech_adapter.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_speech_config(path: str | Path) -> SpeechConfig:
    """The :class:`SpeechConfig` of a speech model directory; CheckpointError naming the file otherwise."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a speech model: it has no {ADAPTER_CONFIG}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); export the speech model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("speech"), dict):
        raise CheckpointError(f"{file} is not a herd speech adapter config (format {FORMAT!r} with a 'speech' "
                              "mapping); export the speech model again")
    try:
        return SpeechConfig.from_dict(meta["speech"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {err}") from None


def save_speech(
    model: SpeechLanguageModel, path: str | Path, tokenizer: Any = None, *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the language model as a Llama directory and the speech adapter beside it (see the module docstring).

    ``state_dict`` replaces the model's own (herd names, e.g. a sharded model's gathered state).
    """
    state = state_dict if state_dict is not None else model.state_dict()
    backbone = {name.removeprefix("backbone."): t for name, t in state.items() if name.startswith("backbone.")}
    adapter = {name: t.detach().contiguous().cpu() for name, t in state.items()
               if name.startswith(("encoder.", "adapter."))}
    with modeldir.staged_directory(path) as out:  # the language model and the adapter appear together
        hf.save(model.backbone, out, tokenizer=tokenizer, state_dict=backbone)
        modeldir.save_safetensors(adapter, out / ADAPTER_WEIGHTS)
        meta = {"format": FORMAT, "speech": model.speech_config.to_dict(), "features": FEATURES,
                "special_tokens": SPEECH_TOKENS}
        (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def load_speech(
    path: str | Path, *, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None,
    device: str | torch.device = "cpu",
) -> SpeechLanguageModel:
    """A :class:`SpeechLanguageModel` from a speech model directory: the LM and every adapter tensor.

    A missing, unexpected or misshapen adapter tensor is a CheckpointError naming it.
    """
    path = Path(path)
    speech = read_speech_config(path)
    backbone = hf.load(path, dtype=dtype, config=config, device=device)
    model = SpeechLanguageModel(backbone, speech).to(device=device, dtype=dtype)
    expected = {name: t for name, t in model.state_dict().items() if name.startswith(("encoder.", "adapter."))}
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; export the speech model again")
    loaded: dict[str, torch.Tensor] = {}
    with safe_open(str(file), framework="pt", device=str(device)) as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {name!r}; is {ADAPTER_CONFIG} the config it was "
                                      "written with?")
            tensor = weights.get_tensor(name)
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"{file}: {name} has shape {tuple(tensor.shape)} but {ADAPTER_CONFIG} gives "
                                      f"{tuple(expected[name].shape)}")
            loaded[name] = tensor.to(dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{file} lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}")
    model.load_state_dict(loaded, strict=False)
    return model
