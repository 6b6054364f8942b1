"""herd's training entry point: the one place where config becomes objects.

``train(cfg)`` instantiates the model config, DataModule, stage, callbacks, loggers and trainer,
fits, optionally tests, and exports the final model as a Hugging Face directory. ``main()`` only
wraps it for the command line::

    python -m herd.train                                  # tiny pretraining on the embedded corpus
    python -m herd.train model=llama3_8b trainer=gpu strategy=ddp trainer.devices=8
    python -m herd.train debug=fast                       # one batch of everything
    python -m herd.train resume=auto                      # continue the newest run of this task
"""

from __future__ import annotations

import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from herd.callbacks.checkpoint_io import AtomicCheckpointIO
from herd.interop import hf
from herd.model import ModelConfig
from herd.paths import repo_root
from herd.presets import config_dir
from herd.stages.parallelize import full_state_dict


def run_id() -> str:
    """Names a run folder; the same on every rank and node of one launch.

    A SLURM job id or a torchrun rendezvous id (``--rdzv-id``) when there is one, ``HERD_RUN_ID``
    if set, else the start time (single-node launches: Lightning passes the folder to its ranks).
    """
    if os.environ.get("HERD_RUN_ID"):
        return os.environ["HERD_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


OmegaConf.register_new_resolver("herd_root", lambda: str(repo_root()), replace=True)
OmegaConf.register_new_resolver("herd_run_id", run_id, replace=True)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured stage and export the result; returns the final metrics and paths."""
    output_dir = Path(cfg.paths.output_dir)
    objects = build(cfg)
    trainer, stage, datamodule = objects["trainer"], objects["stage"], objects["datamodule"]
    hyperparameters = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in cfg.items() if k != "hydra"}
    for logger in trainer.loggers:
        logger.log_hyperparams(hyperparameters)
    ckpt_path = resume_checkpoint(cfg, output_dir)
    start = {}
    if cfg.validate_first and ckpt_path is None and not trainer.fast_dev_run:
        start = {k: float(v) for k, v in trainer.validate(stage, datamodule=datamodule, verbose=False)[0].items()}
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.test:
        metrics |= {f"test/{k}": float(v) for k, v in trainer.test(stage, datamodule=datamodule)[0].items()}
    result: dict[str, Any] = {"metrics": metrics, "start": start, "output_dir": str(output_dir),
                              "trainer": trainer, "stage": stage, "datamodule": datamodule}
    if cfg.export:
        state = full_state_dict(stage.model)  # a collective when the model is sharded: every rank calls it
        if trainer.is_global_zero:
            tokenizer = getattr(datamodule, "tokenizer", None)
            result["export_dir"] = str(hf.save(stage.model, output_dir / "export", tokenizer=tokenizer,
                                               state_dict=state))
    if trainer.is_global_zero:
        print_summary(cfg, result)
    return result


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate every object of a run without training (tests use it for every config group)."""
    L.seed_everything(cfg.seed, workers=True)
    _check_strategy(cfg)
    try:
        model_config = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        # _convert_="all": objects receive plain dicts and lists, never a DictConfig.
        datamodule = instantiate(cfg.data, _convert_="all")
        # Partial first: Hydra would turn a dataclass keyword argument into a DictConfig.
        stage = instantiate(cfg.stage, _partial_=True, _convert_="all")(model=model_config)
        callbacks = [instantiate(c, _convert_="all") for c in cfg.callbacks.values() if c is not None]
        loggers = [instantiate(c, _convert_="all") for c in cfg.logger.values() if c is not None] if cfg.logger else False
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()],
                              _convert_="all")
    except InstantiationException as err:
        raise ConfigError(_explain(err)) from err
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    _check_optimizer(stage)
    return {"model_config": model_config, "datamodule": datamodule, "stage": stage, "trainer": trainer}


def _check_strategy(cfg: DictConfig) -> None:
    """Refuse strategy/hardware combinations before anything is built, with the fix."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy)
    on_cpu = cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and (target.endswith("fsdp1_strategy") or target.endswith("FSDPStrategy") or target == "fsdp"):
        raise ConfigError("strategy=fsdp (Lightning's FSDPStrategy, FSDP1) needs GPUs; on a CPU use strategy=fsdp2 "
                          "(FSDP2 through ModelParallelStrategy), which shards the same way and runs on gloo")


def _check_optimizer(stage) -> None:
    """Build the optimizer once on a probe parameter, so bad values fail now, not after setup."""
    try:
        stage.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as err:
        keywords = dict(getattr(stage.optimizer_factory, "keywords", {}))
        raise ConfigError(f"stage.optimizer {keywords} is invalid: {err}") from err


def _explain(err: InstantiationException) -> str:
    """Hydra wraps the real error; surface its message, which names the key."""
    cause = err.__cause__
    return f"{err}" if cause is None else f"{err}\n  caused by {type(cause).__name__}: {cause}"


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """``ckpt_path``, or with ``resume=auto`` the newest ``last.ckpt`` of an earlier run of this task."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.exists():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(path)
    if cfg.resume in (None, False):
        return None
    if cfg.resume != "auto":
        raise ConfigError(f"resume={cfg.resume!r}: use resume=auto, or ckpt_path=<file> for a given checkpoint")
    runs = Path(cfg.paths.log_dir) / str(cfg.task) / "runs"
    candidates = [p for p in runs.glob("*/checkpoints/last.ckpt") if output_dir not in p.parents]
    if not candidates:
        rank_zero_info(f"resume=auto: no last.ckpt under {runs}; starting fresh")
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    rank_zero_info(f"resume=auto: continuing from {newest}")
    return str(newest)


def _unigram_entropies(datamodule) -> dict[str, float]:
    """Per source, from the manifest herd.prepare wrote (empty for other data)."""
    manifests = getattr(datamodule, "manifests", {}) or {}
    out = {}
    for manifest in manifests.values():
        for name, source in manifest.data.get("sources", {}).items():
            value = source.get("splits", {}).get("train", {}).get("unigram_entropy")
            if value is not None:
                out[name] = value
    return out


def print_summary(cfg: DictConfig, result: dict[str, Any]) -> None:
    """Where things are, and how the validation loss moved."""
    metrics, start = result["metrics"], result["start"]
    vocab = result["stage"].model_config.vocab_size
    lines = ["", "herd: training finished."]
    if "val/loss" in start and "val/loss" in metrics:
        lines.append(f"  val/loss {start['val/loss']:.3f} -> {metrics['val/loss']:.3f} "
                     f"(uniform guess ln({vocab}) = {math.log(vocab):.3f})")
    entropies = _unigram_entropies(result.get("datamodule"))
    if entropies:
        lines.append("  unigram entropy of the train data (a context-free model's best loss): "
                     + ", ".join(f"{name} {value:.3f}" for name, value in entropies.items()))
    lines.append(f"  run folder:       {result['output_dir']}")
    if "export_dir" in result:
        lines.append(f"  exported model:   {result['export_dir']}")
    if cfg.logger and "tensorboard" in cfg.logger:
        lines.append(f"  TensorBoard:      tensorboard --logdir {Path(cfg.paths.log_dir) / str(cfg.task)}")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    """Command-line entry; a user error prints one clear message and exits with status 2."""
    try:
        train(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"herd: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
