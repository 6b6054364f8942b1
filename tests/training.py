"""Helpers for tests that run herd.train: compose the config the command line would, shrunk for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

TRAIN_VOCAB = 512


def small_overrides(data_dir: Path | None) -> list[str]:
    """Command-line overrides that shrink a run to a 2-layer model and the test fixture's data
    (``data_dir``; None leaves the data config alone)."""
    data = [f"data.data_dir={data_dir}", "data.num_workers=0", "data.seq_len=64", "data.batch_size=8"]
    return [*(data if data_dir is not None else []), f"model.vocab_size={TRAIN_VOCAB}", "model.dim=64",
            "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def compose_train(tmp_path: Path, data_dir: Path | None, *overrides: str) -> DictConfig:
    """The ``train`` config as the command line would compose it, shrunk for tests and rooted in tmp_path."""
    from herd.presets import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[*small_overrides(data_dir), *overrides])
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "logs" / "run")
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    HydraConfig.instance().set_config(cfg)
    return cfg
