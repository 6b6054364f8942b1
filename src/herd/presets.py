"""Where herd's Hydra configs live, and reading a model preset without Hydra."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from herd.model import ModelConfig


def config_dir() -> Path:
    """The configs/ folder: ``$HERD_CONFIG_DIR`` if set, else the one beside src/ in the checkout."""
    override = os.environ.get("HERD_CONFIG_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "configs"
    if not path.is_dir():
        raise FileNotFoundError(
            f"herd's configs folder {path} does not exist; install herd from a checkout (pip install -e .) "
            "or point HERD_CONFIG_DIR at the configs/ folder"
        )
    return path


def model_preset(name: str) -> ModelConfig:
    """Read ``configs/model/<name>.yaml`` into a ModelConfig."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no model preset {path}; known presets: {known}")
    return ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
