"""Train one stage (pretraining, long context, SFT, reward, DPO, vision or speech adapter) and export the model.

herd's training entry point, the one place where config becomes objects: ``train(cfg)``
instantiates the model config, DataModule, stage, callbacks, loggers and trainer, fits, optionally
tests, and exports the final model as a Hugging Face directory. ``main()`` only wraps it for the
command line::

    python -m herd.train                                  # tiny pretraining on the embedded corpus
    python -m herd.train model=llama3_8b trainer=gpu strategy=ddp trainer.devices=8
    python -m herd.train debug=fast                       # one batch of everything
    python -m herd.train resume=auto                      # a requeue: continue this run folder's checkpoint
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from herd import cli, logs, threads
from herd.data.manifest import ManifestError
from herd.data.shards import ShardError
from herd.data.tokenizer import Tokenizer, TokenizerError
from herd.interop import gguf, hf
from herd.interop.hf import CheckpointError
from herd.model import ModelConfig
from herd.paths import disk_full, resolve
from herd.presets import config_dir
from herd.stages.base import NonFiniteError, all_finite
from herd.stages.checkpoint_io import (
    AtomicCheckpointIO,
    check_dcp_metadata,
    checkpoint_is_complete,
    checkpoint_metadata,
    recoverable_checkpoint,
    remove_stale_temporaries,
)

logger = logs.get_logger(__name__)


cli.register_resolvers()


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured stage and export the result; returns the final metrics and paths.

    Every check that can fail on the user's input (config, checkpoint, tokenizer) runs before any
    training or validation, so a bad run fails in seconds and leaves nothing that looks like a run.
    """
    logs.filter_reviewed_warnings()
    output_dir = Path(cfg.paths.output_dir)
    (output_dir / FAILED_FILE).unlink(missing_ok=True)  # a requeued or restarted run tries again
    _check_run_length(cfg)
    threads.apply(thread_budget(cfg))  # before anything runs a torch op
    objects = build(cfg)
    trainer, stage, datamodule = objects["trainer"], objects["stage"], objects["datamodule"]
    if _is_rank_zero():
        _clean_checkpoint_folders(trainer, output_dir)
    hyperparameters = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in cfg.items() if k != "hydra"}
    stage.run_record = {"config": hyperparameters, "data": data_fingerprint(datamodule)}
    resume = resume_checkpoint(cfg, output_dir)
    finishing = resume is not None and _check_resume(cfg, resume, stage)
    _check_tokenizer_match(cfg, stage, datamodule)
    _continue_logs(trainer, output_dir, resume, finishing)
    for run_logger in trainer.loggers:
        run_logger.log_hyperparams(hyperparameters)
    if cfg.validate_first and resume is None and not trainer.fast_dev_run:
        validated = trainer.validate(stage, datamodule=datamodule, verbose=False)
        if validated:  # nothing without val shards (the data module has said that validation is skipped)
            stage.start_metrics = {k: float(v) for k, v in validated[0].items()}
    # finishing: the run's own checkpoint is at max_steps (the run was stopped after saving it, before its
    # export): fit restores it, trains no step and runs the end-of-training hooks (e.g. checkpoint averaging)
    # the checkpoint is set on the trainer (not passed to fit) so that callbacks see it from on_fit_start on,
    # also where a sharded strategy restores it only after on_fit_start (see callbacks.schedules)
    trainer.ckpt_path = resume.path if resume else None
    trainer.fit(stage, datamodule=datamodule)
    if finishing:
        # the stop may have come before the last validation was logged: validate the model that is exported
        trainer.validate(stage, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    skipped = _skipped_shards(trainer, datamodule)
    if skipped is not None:
        metrics["data/skipped_shards"] = float(skipped)
    if cfg.test:
        metrics |= {f"test/{k}": float(v) for k, v in trainer.test(stage, datamodule=datamodule)[0].items()}
    result: dict[str, Any] = {"metrics": metrics, "start": dict(stage.start_metrics), "output_dir": str(output_dir),
                              "trainer": trainer, "stage": stage, "datamodule": datamodule, "resume": resume,
                              "finished_only": finishing}
    if cfg.export:
        state = stage.export_state()  # a collective when the model is sharded: every rank calls it
        if trainer.is_global_zero:
            if not all_finite(state.values()):
                raise NonFiniteError("the final weights hold non-finite values: no export is written. Lower "
                                     "stage.optimizer.lr, or set stage.on_nonfinite=skip_step.")
            tokenizer = getattr(datamodule, "tokenizer", None)
            result["export_dir"] = str(stage.save_export(output_dir / "export", state, tokenizer=tokenizer))
    for run_logger in trainer.loggers:
        if hasattr(run_logger, "log_run_summary"):
            run_logger.log_run_summary(hyperparameters, metrics)
        if "data/skipped_shards" in metrics:
            run_logger.log_metrics({"data/skipped_shards": metrics["data/skipped_shards"]}, step=trainer.global_step)
    if trainer.is_global_zero:
        print_summary(cfg, result)
    return result


def _is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def _clean_checkpoint_folders(trainer: L.Trainer, output_dir: Path) -> None:
    """Remove what killed saves left in the run's checkpoint folders, and roll back an interrupted swap.

    Rank 0 does it before training; the other ranks cannot save before they join it in ``fit``.
    """
    folders = {output_dir / "checkpoints"} | {Path(c.dirpath) for c in trainer.checkpoint_callbacks
                                              if getattr(c, "dirpath", None) and "://" not in str(c.dirpath)}
    for folder in sorted(folders):
        for path in remove_stale_temporaries(folder):
            done = "restored" if path.exists() else "removed"  # a swap killed between its renames is rolled back
            logs.info(logger, f"{done} {path}, left by a checkpoint save that was killed")


def _check_run_length(cfg: DictConfig) -> None:
    """Refuse a run that cannot train: no steps, or no length for the LR schedule."""
    max_steps = cfg.trainer.get("max_steps")
    if cfg.trainer.get("fast_dev_run"):
        return
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps == 0 or max_steps < -1:
        raise ConfigError(f"trainer.max_steps={max_steps!r}: give the number of optimizer steps to train, a "
                          "positive integer (e.g. trainer.max_steps=300), or -1 when a context schedule or "
                          "stage.scheduler.total_steps sets the run's length")
    ends_run = bool(cfg.get("callbacks") and cfg.callbacks.get("context_schedule"))
    has_length = cfg.stage.get("scheduler") is None or cfg.stage.scheduler.get("total_steps") is not None
    if max_steps == -1 and not (ends_run or has_length):
        raise ConfigError("trainer.max_steps=-1 trains forever, and the LR schedule needs a length: set "
                          "trainer.max_steps to a positive number of steps, or stage.scheduler.total_steps")


def _continue_logs(trainer: L.Trainer, output_dir: Path, resume: Resume | None, finishing: bool = False) -> None:
    """A run resumed in its own folder appends to its logs from the checkpoint's step on; a fresh run in a
    folder that already holds logs (a restart before the first checkpoint) hides the old ones. A run that
    is only finished (its checkpoint is at max_steps) keeps everything, the checkpoint's step included."""
    in_place = resume is not None and resume.in_place
    if not in_place and not any(output_dir.glob("*/events.out.tfevents.*")) \
            and not any(output_dir.glob("*/metrics.csv")):
        return
    for run_logger in trainer.loggers:
        if hasattr(run_logger, "resume_at"):
            run_logger.resume_at((resume.step + 1 if finishing else resume.step) if in_place else 0)


def _skipped_shards(trainer: L.Trainer, datamodule) -> int | None:
    """Damaged shards skipped on all ranks (``data.on_corrupt_shard=skip``); None without such a count."""
    count = getattr(datamodule, "skipped_shards", None)
    if count is None:
        return None
    total = trainer.strategy.reduce(torch.tensor(float(count)), reduce_op="sum")
    return int(total)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate every object of a run without training (tests use it for every config group)."""
    L.seed_everything(cfg.seed, workers=True)
    _check_strategy(cfg)
    try:
        model_config = model_config_of(cfg)
        # _convert_="all": objects receive plain dicts and lists, never a DictConfig.
        datamodule = instantiate(cfg.data, _convert_="all")
        # Partial first: Hydra would turn a dataclass keyword argument into a DictConfig.
        stage = instantiate(cfg.stage, _partial_=True, _convert_="all")(model=model_config)
        callbacks = [instantiate(c, _convert_="all") for c in cfg.callbacks.values() if c is not None]
        loggers = [instantiate(c, _convert_="all") for c in cfg.logger.values() if c is not None] if cfg.logger else False
        trainer = instantiate(_lightning_trainer(cfg), callbacks=callbacks, logger=loggers,
                              plugins=[AtomicCheckpointIO()], _convert_="all")
    except InstantiationException as err:
        raise ConfigError(_explain(err)) from err
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    _check_optimizer(stage)
    return {"model_config": model_config, "datamodule": datamodule, "stage": stage, "trainer": trainer}


def _lightning_trainer(cfg: DictConfig) -> DictConfig:
    """``cfg.trainer`` without herd's own keys (``threads``), for Lightning's Trainer."""
    trainer = copy.copy(cfg.trainer)  # keeps its parent: ${paths.output_dir} still resolves
    with open_dict(trainer):
        trainer.pop("threads", None)
    return trainer


def thread_budget(cfg: DictConfig) -> threads.ThreadBudget:
    """torch's intra-op threads for this process (:mod:`herd.threads`): ``trainer.threads``, or herd's
    choice from the cores it may use, those other processes keep busy, the ranks sharing them and the
    loader workers that decode media (``data.num_workers`` of a DataModule with ``decodes_media``)."""
    target = cfg.data.get("_target_")
    media = bool(target) and getattr(get_class(target), "decodes_media", False)
    try:
        return threads.choose(workers=int(cfg.data.get("num_workers") or 0) if media else 0,
                              devices=_devices_per_node(cfg.trainer), threads=cfg.trainer.get("threads"))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _devices_per_node(trainer: DictConfig) -> int:
    """The ranks Lightning starts on this node: ``trainer.devices`` (a count, a list, or auto/-1)."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return max(1, len(devices))
    if isinstance(devices, str) and devices.strip().isdigit():
        return max(1, int(devices))
    on_gpu = trainer.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return max(1, torch.cuda.device_count()) if on_gpu else 1  # auto / -1: every GPU, or one CPU process


def model_config_of(cfg: DictConfig) -> ModelConfig:
    """The run's ModelConfig: the ``model`` preset, or (``model=checkpoint``) the shape of ``stage.init_from``.

    With ``from_checkpoint: true`` the config.json of ``stage.init_from`` (a model directory or a
    .gguf file) gives the shape, and the preset's other non-null keys (``max_seq_len``,
    ``attention``, ...) override it.
    """
    values = OmegaConf.to_container(cfg.model, resolve=True)
    if not values.pop("from_checkpoint", False):
        return ModelConfig.from_dict(values)
    init_from = cfg.stage.get("init_from")
    if not init_from:
        raise ValueError("model=checkpoint takes the model's shape from stage.init_from, which is not set: pass "
                         "stage.init_from=<model directory or .gguf file>, or choose a model preset (model=tiny, ...)")
    path = gguf.model_dir(resolve(str(init_from)))
    stored = hf.read_config(path)
    overrides = {key: value for key, value in values.items() if value is not None}
    config = ModelConfig.from_dict({**stored.to_dict(), **overrides})
    differences = stored.architecture_differences(config)
    if differences:
        raise ValueError(f"model=checkpoint: the model keys given differ from {path}'s shape ({'; '.join(differences)}); "
                         "leave them null to take the checkpoint's")
    return config


def _check_strategy(cfg: DictConfig) -> None:
    """Refuse strategy/hardware combinations before anything is built, with the fix."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy)
    on_cpu = cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and (target.endswith("fsdp1_strategy") or target.endswith("FSDPStrategy") or target == "fsdp"):
        raise ConfigError("strategy=fsdp (Lightning's FSDPStrategy, FSDP1) needs GPUs; on a CPU use strategy=fsdp2 "
                          "(FSDP2 through ModelParallelStrategy), which shards the same way and runs on gloo")
    context = strategy.get("context_parallel_size", 1) if OmegaConf.is_dict(strategy) else 1
    stage = cfg.stage.get("_target_")
    if isinstance(context, int) and context > 1 and stage and not get_class(stage).supports_context_parallel:
        raise ConfigError(f"strategy.context_parallel_size={context}: stage {stage.rsplit('.', 1)[-1]} does not run "
                          "under context parallelism; use it with stage=pretrain, long_context or sft, or set "
                          "strategy.context_parallel_size=1")
    if isinstance(context, int) and context > 1 and cfg.data.get("seq_len") and cfg.data.seq_len % (2 * context):
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not cut into 2 x strategy.context_parallel_size = "
                          f"{2 * context} equal chunks: use a multiple of {2 * context}")


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


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from: where, at which step, why, and whether it is the run's own."""

    path: str
    step: int
    reason: str
    in_place: bool
    metadata: dict[str, Any]


RESUME_MODES = ("auto", "latest")


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> Resume | None:
    """``ckpt_path``, or with ``resume=auto``/``latest`` the checkpoint to continue (None: start fresh).

    ``resume=auto`` continues only this run's own checkpoints: those in its own folder (a SLURM
    requeue, a torchrun restart with the same ``--rdzv-id`` or the same ``HERD_RUN_ID`` lands
    there): its ``last.ckpt`` or a checkpoint Lightning saved on SLURM's pre-emption signal, the
    furthest step first. Without one the run starts fresh, and says so: another run's checkpoint
    is never adopted silently. ``resume=latest`` falls back to the newest ``last.ckpt`` of an
    earlier run of this task, and ``ckpt_path`` names one; either is then checked against this
    run's config (:func:`_check_resume`). Incomplete checkpoints (from a killed save) are skipped
    with a warning naming them.
    """
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        recovered = recoverable_checkpoint(path)
        if recovered is None:
            problem = "does not exist" if not path.exists() else (
                "is not a complete checkpoint (its save was interrupted, or it is not a checkpoint)")
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} {problem}; pick another one from the run's "
                              "checkpoints/ folder")
        reason = "given as ckpt_path" if recovered == path else (
            f"given as ckpt_path={path}, whose save was killed while replacing it: this is the previous "
            "complete checkpoint of that name")
        return _announce(_resume(recovered, reason, output_dir), "ckpt_path")
    if cfg.resume in (None, False):
        return None
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"resume={cfg.resume!r}: use resume=auto (this run's own checkpoint: a requeue or restart), "
                          "resume=latest (else the newest run of this task), or ckpt_path=<file> for a given checkpoint")
    key = f"resume={cfg.resume}"
    own = [output_dir / "checkpoints" / "last.ckpt", *sorted(output_dir.glob("hpc_ckpt_*.ckpt"))]
    own = _complete([p for p in own if p.exists()], key)
    if own:
        steps = {p: int(checkpoint_metadata(p).get("global_step", 0)) for p in own}
        best = max(own, key=lambda p: (steps[p], p.stat().st_mtime))
        return _announce(_resume(best, "this run's own folder holds it (a requeue or restart of the same run "
                                 "id), and it is the furthest of its checkpoints", output_dir), key)
    runs = Path(cfg.paths.log_dir) / str(cfg.task) / "runs"
    others = _other_runs_checkpoints(runs, output_dir, key if cfg.resume == "latest" else None)
    if cfg.resume == "auto" or not others:
        note = ""
        if others:
            newest = max(others, key=lambda p: p.stat().st_mtime)
            note = (f"; other runs of task {cfg.task!r} have checkpoints (the newest: {newest}), which resume=auto "
                    "never continues: pass ckpt_path=<file> (or resume=latest) to continue one of them")
        logs.info(logger, f"{key}: no complete last.ckpt in this run's folder {output_dir}; starting fresh{note}")
        return None
    newest = max(others, key=lambda p: p.stat().st_mtime)
    when = datetime.fromtimestamp(newest.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    return _announce(_resume(newest, f"the most recently written last.ckpt of task {cfg.task!r} ({when}, "
                             f"{len(others)} candidate(s) under {runs})", output_dir), key)


def _other_runs_checkpoints(runs: Path, output_dir: Path, key: str | None) -> list[Path]:
    """The complete ``last.ckpt`` of every other run folder under ``runs`` (read only: they may be running);
    incomplete ones are named in a warning when ``key`` (the option looking for them) is given."""
    others = []
    for folder in sorted(runs.glob("*/checkpoints")):
        if output_dir.resolve() in folder.resolve().parents:
            continue
        recovered = recoverable_checkpoint(folder / "last.ckpt")
        if recovered is not None:
            others.append(recovered)
        elif key is not None and (folder / "last.ckpt").exists():
            logs.warning(logger, f"{key}: skipping {folder / 'last.ckpt'}: an incomplete checkpoint (its save "
                                 "was interrupted)")
    return others


def _complete(paths: list[Path], key: str) -> list[Path]:
    complete = [p for p in paths if checkpoint_is_complete(p)]
    for path in sorted(set(paths) - set(complete)):
        logs.warning(logger, f"{key}: skipping {path}: an incomplete checkpoint (its save was interrupted)")
    return complete


def _resume(path: Path, reason: str, output_dir: Path) -> Resume:
    try:
        metadata = checkpoint_metadata(path)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    in_place = output_dir.resolve() in path.resolve().parents
    return Resume(str(path), int(metadata.get("global_step", 0)), reason, in_place, metadata)


def _announce(resume: Resume, key: str = "resume=auto") -> Resume:
    logs.info(logger, f"{key}: continuing from {resume.path} at step {resume.step}: {resume.reason}")
    return resume


def _check_resume(cfg: DictConfig, resume: Resume, stage) -> bool:
    """Refuse a checkpoint of another model shape, another run's finished one, or an unsafe sharded one,
    before any work. True when the checkpoint is this run's own and already at ``trainer.max_steps``: the
    run was stopped after its last save (before its export), so it is finished, not trained further."""
    stored = resume.metadata.get("herd", {}).get("model_config")
    if stored is None:
        raise ConfigError(f"{resume.path} is not a herd checkpoint (it holds no model config); resume from a "
                          "checkpoint herd wrote, or start from a model directory with stage.init_from=")
    differences = ModelConfig.from_dict(stored).architecture_differences(stage.model_config)
    if differences:
        raise ConfigError(f"{resume.path} holds a different model than this run's config: "
                          + "; ".join(differences) + ". Resume with the model settings it was trained with, "
                          "or start a new run from its export with stage.init_from=")
    _check_run_settings(cfg, resume, stage)
    if Path(resume.path).is_dir():
        try:
            check_dcp_metadata(resume.path)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    max_steps = cfg.trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0 and resume.step >= max_steps and not cfg.trainer.get("fast_dev_run"):
        if resume.in_place:
            logs.info(logger, f"{resume.path} is at step {resume.step}, trainer.max_steps={max_steps}: the run was "
                              "stopped after its last checkpoint; finishing it (validation and export) without "
                              "training further")
            return True
        raise ConfigError(f"{resume.path} is at step {resume.step}, so it already reached trainer.max_steps="
                          f"{max_steps}: there is nothing left to train. To continue it, raise trainer.max_steps "
                          f"(e.g. trainer.max_steps={2 * max_steps}); its model is in the run's export/ folder.")
    return False


# What a resume compares beyond the model's shape: the keys (and everything under them) whose change changes
# the run. The model's other fields (RoPE, max_seq_len, attention) are the context schedule's and may change.
RUN_KEYS = ("seed", "stage", "data", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
            "trainer.gradient_clip_algorithm", "callbacks.batch_ramp")
# Under RUN_KEYS, what may change on purpose when a run is continued: speed, memory, failure handling, and
# the sequence length a context schedule sets (validation, logging and checkpoint frequency, trainer.max_steps
# and the context schedule are not in RUN_KEYS at all).
FREE_KEYS = ("data.num_workers", "data.pin_memory", "data.val_batch_size", "data.on_corrupt_shard", "data.seq_len",
             "data.expected_vocab_size", "data.expected_tokenizer_fingerprint", "stage.on_nonfinite",
             "stage.max_consecutive_skips", "stage.activation_checkpointing", "stage.compile_blocks", "stage.fsdp",
             "stage.meta_init", "stage.loss_chunk_size", "stage.allow_random_init")


def data_fingerprint(datamodule) -> str | None:
    """A digest of the prepared data a DataModule reads (the shards' contents, see
    :attr:`herd.data.manifest.Manifest.content_fingerprint`); None for data without a manifest."""
    manifests = getattr(datamodule, "manifests", None) or {}
    if not manifests:
        return None
    parts = sorted(manifest.content_fingerprint for manifest in manifests.values())
    return hashlib.sha256(",".join(parts).encode()).hexdigest()[:16]


def run_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: <checkpoint's> (checkpoint) vs <config's> (config)`` for every key under :data:`RUN_KEYS`
    (less :data:`FREE_KEYS`) whose resolved value differs between two runs' configs."""
    old, new = _flatten(stored), _flatten(current)
    keys = sorted(k for k in set(old) | set(new) if _compared(k) and old.get(k, _ABSENT) != new.get(k, _ABSENT))
    return [f"{k}: {_shown(old.get(k, _ABSENT))} (checkpoint) vs {_shown(new.get(k, _ABSENT))} (config)" for k in keys]


_ABSENT = object()


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict) and values:
        out: dict[str, Any] = {}
        for key, value in values.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: values}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _compared(key: str) -> bool:
    return _under(key, RUN_KEYS) and not _under(key, FREE_KEYS)


def _shown(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_run_settings(cfg: DictConfig, resume: Resume, stage) -> None:
    """Refuse to continue a checkpoint with settings that change its run (stage, data, optimizer, schedule,
    seed), listing them, unless ``resume_with_changes=true``; and always refuse state that only holds for the
    data it was trained on (DPO's precomputed reference log-probs) on other data."""
    herd = resume.metadata.get("herd", {})
    stored = herd.get("run")
    current = stage.run_record or {}
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        logs.warning(logger, f"{resume.path} holds no record of its run's settings (it was written by an older "
                             "herd): only its model shape was checked against this run's config")
        return
    differences = run_differences(stored["config"], current.get("config", {}))
    same_data = None in (stored.get("data"), current.get("data")) or stored.get("data") == current.get("data")
    if not same_data:
        bound = stage.data_bound_state(herd)
        location = cfg.data.get("data_dir", "the configured data")
        if bound is not None:
            raise ConfigError(f"{resume.path} was trained on other data than {location} holds now (data fingerprint "
                              f"{stored['data']} vs {current['data']}: it was prepared again since), and it keeps "
                              f"{bound}, which do not fit the new data. Resume on the data it was trained on, or "
                              "start a new run (without ckpt_path or resume)")
        differences.append(f"data (the prepared shards' contents): {stored['data']} (checkpoint) vs "
                           f"{current['data']} (config)")
    if not differences:
        return
    if cfg.get("resume_with_changes"):
        logs.warning(logger, f"resume_with_changes=true: continuing {resume.path} with other settings than it was "
                             "trained with: " + "; ".join(differences))
        return
    raise ConfigError(f"{resume.path} was trained with other settings than this run's config, which would change "
                      "its run: " + "; ".join(differences) + ". Resume with the settings it was trained with, or "
                      "pass resume_with_changes=true to continue it with these (trainer.max_steps, validation, "
                      "logging and checkpoint frequency and the context schedule may change without it)")


def _check_tokenizer_match(cfg: DictConfig, stage, datamodule) -> None:
    """A model directory (``stage.init_from``) must come with the data's tokenizer (by fingerprint)."""
    init_from = getattr(stage, "init_from", None)
    manifests = getattr(datamodule, "manifests", None)
    if not init_from or not manifests:
        return
    data_fingerprint = datamodule.manifest.fingerprint
    model_tokenizer = Path(init_from) / "tokenizer.json"
    if not model_tokenizer.is_file():
        logs.warning(logger, f"{init_from} has no tokenizer.json: herd cannot check that the data in "
                             f"{datamodule.manifest.location} was prepared with the model's tokenizer")
        return
    try:
        model_fingerprint = Tokenizer.load(init_from).fingerprint
    except TokenizerError as err:  # names the file at fault: tokenizer.json or tokenizer_config.json
        raise ConfigError(f"stage.init_from={init_from}: {err}") from None
    if model_fingerprint == data_fingerprint:
        return
    if cfg.get("allow_tokenizer_mismatch"):
        logs.warning(logger, f"allow_tokenizer_mismatch=true: {init_from} (tokenizer {model_fingerprint}) trains on "
                             f"data prepared with tokenizer {data_fingerprint}")
        return
    raise ConfigError(
        f"stage.init_from={init_from} uses the tokenizer with fingerprint {model_fingerprint}, but the data in "
        f"{datamodule.manifest.location} was prepared with {data_fingerprint}: the same ids would mean other "
        f"tokens. Prepare the data with the model's tokenizer (python -m herd.prepare tokenizer.path={init_from} "
        "...), or, if the two tokenizers are known to agree, set allow_tokenizer_mismatch=true")


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


def tensorboard_dir(cfg: DictConfig, output_dir: Path) -> Path:
    """The folder to give ``tensorboard --logdir``: the task's folder (``logs/<task>``, every run of the
    task side by side) when the run folder lies in it, else the run folder itself (``hydra.run.dir`` set
    elsewhere, as herd.pipeline does for each step: its step folder)."""
    task_dir = Path(cfg.paths.log_dir) / str(cfg.task)
    if task_dir.resolve() in output_dir.resolve().parents:
        return task_dir
    return output_dir


def print_summary(cfg: DictConfig, result: dict[str, Any]) -> None:
    """Where things are, and how the validation loss moved (also after a resume)."""
    metrics, start, resume = result["metrics"], result["start"], result.get("resume")
    vocab = result["stage"].model_config.vocab_size
    lines = ["", "herd: training finished."]
    if resume is not None:
        finished = " (already at max_steps: finished without training)" if result.get("finished_only") else ""
        lines.append(f"  resumed from:     {resume.path} (step {resume.step}){finished}")
    next_token = getattr(result["stage"], "next_token_loss", True)
    for key in getattr(result["stage"], "summary_metrics", ("val/loss",)):
        if key in metrics:
            before = f"{start[key]:.3f} -> " if key in start else ""
            note = f" (uniform guess ln({vocab}) = {math.log(vocab):.3f})" if key == "val/loss" and next_token else ""
            lines.append(f"  {key} {before}{metrics[key]:.3f}{note}")
    entropies = _unigram_entropies(result.get("datamodule")) if next_token else {}
    if entropies:
        lines.append("  unigram entropy of the train data (a context-free model's best loss): "
                     + ", ".join(f"{name} {value:.3f}" for name, value in entropies.items()))
    if metrics.get("train/skipped_steps"):
        lines.append(f"  non-finite steps skipped: {int(metrics['train/skipped_steps'])}")
    if metrics.get("data/skipped_shards"):
        lines.append(f"  damaged shards skipped: {int(metrics['data/skipped_shards'])} (see the warnings in train.log)")
    lines.append(f"  run folder:       {result['output_dir']}")
    if "export_dir" in result:
        lines.append(f"  exported model:   {result['export_dir']}")
    if cfg.logger and "tensorboard" in cfg.logger:
        lines.append(f"  TensorBoard:      tensorboard --logdir {tensorboard_dir(cfg, Path(result['output_dir']))}")
    logs.info(logger, "\n".join(lines))


FAILED_FILE = "FAILED"


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    """Command-line entry. A user error prints one clear message and exits with status 2; a run stopped
    by a non-finite loss, a full disk or a lack of memory prints one and exits with status 1; any other
    error keeps its traceback. Every failure marks the run folder ``FAILED`` and ends train.log with
    its one-line reason."""
    on_error = partial(_mark_failed, cfg)
    with (_failures_recorded(cfg),
          cli.user_errors("herd.train", USER_ERRORS, prefix="herd", on_error=on_error),
          cli.user_errors("herd.train", (NonFiniteError,), prefix="herd", status=1, on_error=on_error)):
        train(cfg)


USER_ERRORS = (ConfigError, FileNotFoundError, CheckpointError, ManifestError, ShardError)


@contextmanager
def _failures_recorded(cfg: DictConfig) -> Iterator[None]:
    """Record every other failure: a full disk or a lack of memory exits 1 with one line saying so and what
    to do; anything else (a bug) is recorded by its first line and raised on, traceback and all."""
    try:
        yield
    except Exception as err:
        message, expected = failure_message(cfg, err)
        _mark_failed(cfg, message)
        if not expected:
            raise
        print(message, file=sys.stderr)
        sys.exit(1)


def failure_message(cfg: DictConfig, err: BaseException) -> tuple[str, bool]:
    """The one-line ``herd: ...`` reason of a failed run, and whether it is a known kind (a full disk, out
    of memory) rather than a bug."""
    full = disk_full(err)
    if full is not None:
        where = Path(full.filename) if full.filename else Path(cfg.paths.output_dir)
        folder = where.parent if full.filename else where
        what = os.strerror(full.errno).lower()
        return (f"herd: {what} while writing {where} (in {folder}): free space there, or give the run a folder on "
                "another disk (paths.log_dir=... or hydra.run.dir=...), then run the same command with resume=auto: "
                "the last complete checkpoint is intact"), True
    if _out_of_memory(err):
        return (f"herd: out of memory ({_first_line(err)}): lower data.batch_size (or data.seq_len), set "
                "stage.activation_checkpointing=full, or shard the model over more devices (strategy=fsdp2), then "
                "run the same command with resume=auto"), True
    return f"herd: {type(err).__name__}: {_first_line(err)}", False


def _out_of_memory(err: BaseException) -> bool:
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(err, MemoryError | out_of_memory):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def _mark_failed(cfg: DictConfig, message: str) -> None:
    """Keep a failed run's message in train.log and in its folder's ``FAILED`` file."""
    logger.error(message, extra={logs.FILE_ONLY: True})  # train.log; the console gets it on stderr
    if _is_rank_zero():
        output_dir = Path(cfg.paths.output_dir)
        try:
            if output_dir.is_dir():
                (output_dir / FAILED_FILE).write_text(message + "\n")
        except OSError as err:  # a full disk may refuse even this
            print(f"herd: could not write {output_dir / FAILED_FILE}: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
