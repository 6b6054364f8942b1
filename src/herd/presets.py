"""Where herd's Hydra configs live, and reading a model preset without Hydra."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from herd.model import ModelConfig
from herd.paths import repo_root


def config_dir() -> Path:
    """The configs/ folder of the repository root (``$HERD_ROOT`` moves it)."""
    path = repo_root() / "configs"
    if not path.is_dir():
        raise FileNotFoundError(
            f"herd's configs folder {path} does not exist; install herd from a checkout (pip install -e .) "
            "or point HERD_ROOT at a folder that has configs/"
        )
    return path


def model_preset(name: str) -> ModelConfig:
    """Read ``configs/model/<name>.yaml`` into a ModelConfig."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no model preset {path}; known presets: {known}")
    return ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def vision_preset(name: str):
    """Read ``configs/vision/<name>.yaml`` into a :class:`herd.model.vision.VisionConfig`."""
    from herd.model.vision import VisionConfig

    return _adapter_preset(VisionConfig, name)


def speech_preset(name: str):
    """Read ``configs/speech/<name>.yaml`` into a :class:`herd.model.speech.SpeechConfig`."""
    from herd.model.speech import SpeechConfig

    return _adapter_preset(SpeechConfig, name)


def _adapter_preset(cls, name: str):
    path = config_dir() / cls.section / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no {cls.section} preset {path}; known presets: {known}")
    return cls.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
