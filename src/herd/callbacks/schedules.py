"""Schedules over tokens seen: the batch-size / sequence-length ramp and the long-context stages.

Both run each of their stages as one epoch: the callback bounds the epoch to the batches that
reach the stage's end, changes the DataModule's batch size and sequence length, and Lightning
re-creates the train dataloader between epochs (the callback switches
``reload_dataloaders_every_n_epochs`` on). The DataModule must offer ``set_batch_size`` and
``set_seq_len``; herd's re-cuts stored rows to any length, so nothing is re-prepared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from herd import logs
from herd.data.loaders.ranks import data_parallel_size
from herd.evaluation.needle import NeedleResult, collect_haystack, needle_accuracy
from herd.model.loss import next_token_loss

logger = logs.get_logger(__name__)

_STAGE_KEYS = frozenset({"seq_len", "tokens", "batch_size", "rope_theta", "rope_scaling", "weights", "context_parallel"})


@dataclass(frozen=True)
class RampStage:
    """From ``after_tokens`` tokens seen on, read ``batch_size`` rows (per device) of ``seq_len`` tokens."""

    after_tokens: int
    batch_size: int
    seq_len: int


class BatchRamp(L.Callback):
    """Changes the batch size and sequence length as training passes token thresholds (Llama 3's ramp).

    The last stage lasts until ``trainer.max_steps``.
    """

    def __init__(self, stages: Sequence[dict[str, int] | RampStage]) -> None:
        parsed = [s if isinstance(s, RampStage) else RampStage(**s) for s in stages]
        self.stages = sorted(parsed, key=lambda s: s.after_tokens)
        if not self.stages or self.stages[0].after_tokens != 0:
            raise ValueError("callbacks.batch_ramp.stages must start with a stage at after_tokens: 0")
        if any(s.batch_size <= 0 or s.seq_len <= 0 for s in self.stages):
            raise ValueError("callbacks.batch_ramp.stages need positive batch_size and seq_len")

    def stage_at(self, tokens_seen: int) -> int:
        """Index of the stage in force after ``tokens_seen`` tokens."""
        return max(i for i, s in enumerate(self.stages) if s.after_tokens <= tokens_seen)

    def stage_end(self, index: int) -> int | None:
        """Tokens seen when stage ``index`` ends (None: open-ended)."""
        return self.stages[index + 1].after_tokens if index + 1 < len(self.stages) else None

    def final_tokens_per_step(self, trainer: L.Trainer) -> int:
        """Global batch in tokens of the last stage (used to express annealing in tokens)."""
        last = self.stages[-1]
        index = len(self.stages) - 1
        return self.batch_size(trainer, index) * last.seq_len * self.replicas(trainer, index)

    def replicas(self, trainer: L.Trainer, index: int) -> int:
        """Data-parallel replicas during stage ``index`` (each reads ``batch_size`` rows per step)."""
        return data_parallel_size(trainer)

    def batch_size(self, trainer: L.Trainer, index: int) -> int:
        """Rows per data-parallel replica and step in stage ``index``."""
        return self.stages[index].batch_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.reload_dataloaders_every_n_epochs = 1
        self._fit = (trainer, pl_module)
        if not restores_after_fit_start(trainer):  # else: entered by load_state_dict, once tokens_seen is known
            self.enter_stage(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1}  # not empty, so that a resume calls load_state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored()

    def restored(self) -> None:
        """After a restore that comes after ``on_fit_start`` (sharded strategies restore the module, the
        data position and the callbacks after setting the model up), enter the stage in force at the
        restored ``tokens_seen``, before the first train dataloader is made."""
        fit = getattr(self, "_fit", None)
        if fit is not None:
            self.enter_stage(*fit)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.enter_stage(trainer, pl_module)

    def enter_stage(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Set the DataModule and the epoch length for the stage in force now; returns its index."""
        tokens_seen = pl_module.tokens_seen
        index = self.stage_at(tokens_seen)
        stage, end = self.stages[index], self.stage_end(index)
        batch_size = self.batch_size(trainer, index)
        trainer.datamodule.set_batch_size(batch_size)
        trainer.datamodule.set_seq_len(stage.seq_len)
        if end is None:
            trainer.limit_train_batches = 1.0
        else:
            per_step = batch_size * stage.seq_len * self.replicas(trainer, index)
            trainer.limit_train_batches = max(1, math.ceil((end - tokens_seen) / per_step))
        if index != getattr(self, "_announced", None):  # enter_stage also runs at each epoch's end
            self._announced = index
            logs.info(logger, f"schedule: stage {index} from {tokens_seen:,} tokens: batch {batch_size} x "
                              f"seq {stage.seq_len} per data-parallel replica")
        return index


def restores_after_fit_start(trainer: L.Trainer) -> bool:
    """Whether this fit resumes a checkpoint that is restored only after ``on_fit_start`` (sharded
    strategies restore modules and callbacks after setting the model up): the schedule's state and
    ``tokens_seen`` are then known only once the restore has run (:meth:`BatchRamp.restored`)."""
    return bool(trainer.ckpt_path) and trainer.strategy.restore_checkpoint_after_setup


@dataclass
class Gate:
    """When a long-context stage may end (Llama 3: short-context quality recovered, needle solved).

    - ``max_short_loss_increase``: short-context val loss may exceed the starting model's by this
      fraction (0.02 = 2%);
    - ``min_needle_accuracy``: mean needle accuracy over the lengths up to the stage's;
    - ``on_fail``: ``stop`` the run, ``extend`` the stage by ``extend_tokens`` (at most
      ``max_extensions`` times, then stop), or ``warn`` and go on.
    """

    max_short_loss_increase: float = 0.02
    min_needle_accuracy: float = 0.0
    on_fail: str = "warn"
    extend_tokens: int = 0
    max_extensions: int = 1

    def __post_init__(self) -> None:
        if self.on_fail not in ("stop", "extend", "warn"):
            raise ValueError(f"gate.on_fail={self.on_fail!r}: use stop, extend or warn")
        if self.on_fail == "extend" and self.extend_tokens <= 0:
            raise ValueError("gate.on_fail=extend needs gate.extend_tokens > 0")


@dataclass
class NeedleSettings:
    """Needle-in-a-haystack evaluation inside the gate."""

    lengths: list[int] | None = None  # None: powers of two from 256 up to each stage's length
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 4
    seed: int = 0


class ContextSchedule(BatchRamp):
    """Long-context continued pretraining: a list of context stages, each ended by a gate.

    Each stage: ``seq_len``, ``tokens`` (its budget), and optionally ``batch_size`` (rows per
    data-parallel replica; default: ``tokens_per_batch`` tokens per device, i.e. ``tokens_per_batch
    x context_parallel // seq_len`` rows, so the batch in tokens stays constant), ``rope_theta`` and
    ``rope_scaling`` (applied to the model when the stage starts), and ``weights`` (mixture
    weights by source name for this stage; sources it leaves out, and stages without it, use
    ``data.sources.*.weight``), and ``context_parallel`` (under ``strategy=fsdp2_cp``: how many
    ranks share each row in this stage, a divisor of ``strategy.context_parallel_size``; the
    others read rows of their own; default: all of them). The run stops after the last
    stage. Gate results and needle heatmaps are logged as ``gate/*`` and ``needle/*``.
    """

    def __init__(
        self,
        stages: Sequence[dict[str, Any]],
        tokens_per_batch: int | None = None,
        gate: dict[str, Any] | None = None,
        needle: dict[str, Any] | None = None,
        short_seq_len: int | None = None,
        short_val_batches: int = 8,
    ) -> None:
        self.context_stages = [dict(s) for s in stages]
        if not self.context_stages:
            raise ValueError("stage.context_stages needs at least one stage")
        ramp, start = [], 0
        for i, s in enumerate(self.context_stages):
            if "seq_len" not in s or "tokens" not in s:
                raise ValueError(f"context stage {i} needs seq_len and tokens, got {s}")
            unknown = sorted(set(s) - _STAGE_KEYS)
            if unknown:
                raise ValueError(f"context stage {i}: unknown key(s) {unknown}; a stage takes {sorted(_STAGE_KEYS)}")
            batch_size = s.get("batch_size") or (tokens_per_batch or 0) * (s.get("context_parallel") or 1) // s["seq_len"]
            if batch_size <= 0:
                raise ValueError(f"context stage {i}: give batch_size, or tokens_per_batch >= seq_len={s['seq_len']}")
            ramp.append(RampStage(start, batch_size, s["seq_len"]))
            start += int(s["tokens"])
        super().__init__(ramp)
        self.tokens_per_batch = tokens_per_batch or 0
        self.total_tokens = start
        self.gate = Gate(**(gate or {}))
        self.needle = NeedleSettings(**(needle or {}))
        self.short_seq_len = short_seq_len
        self.short_val_batches = short_val_batches
        self.baseline_short_loss: float | None = None
        self.extensions = 0
        self.results: list[dict[str, Any]] = []
        self._current: int | None = None
        self._tokenizer = None
        self._base_weights: dict[str, float] | None = None

    def stage_end(self, index: int) -> int:
        return self.stages[index + 1].after_tokens if index + 1 < len(self.stages) else self.total_tokens

    def planned_steps(self, trainer: L.Trainer) -> int:
        """Optimizer steps of the whole schedule (without gate extensions): the LR schedule's length."""
        steps = 0
        for i, stage in enumerate(self.stages):
            steps += math.ceil((self.stage_end(i) - stage.after_tokens) / (self.batch_size(trainer, i) * stage.seq_len
                                                                            * self.replicas(trainer, i)))
        return steps

    # ----------------------------------------------------------------------------- hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.short_seq_len = self.short_seq_len or trainer.datamodule.seq_len
        if self.baseline_short_loss is None and not restores_after_fit_start(trainer):  # a fresh start
            self.baseline_short_loss = self.short_context_loss(trainer, pl_module)
            result = self.needle_result(trainer, pl_module, max(s.seq_len for s in self.stages))
            self._log(trainer, pl_module, {"stage": -1, "short_loss": self.baseline_short_loss,
                                           "needle": result.mean}, result)
            logs.info(logger, f"long context: starting model, short-context loss {self.baseline_short_loss:.4f}, "
                           f"needle:\n{result.table()}")
        super().on_fit_start(trainer, pl_module)

    def replicas(self, trainer: L.Trainer, index: int) -> int:
        return data_parallel_size(trainer, self._context_parallel_of(trainer, index))

    def batch_size(self, trainer: L.Trainer, index: int) -> int:
        """The stage's ``batch_size``, or ``tokens_per_batch`` tokens per device: a row shared by k ranks
        (context parallelism) counts 1/k on each, so a replica reads k x tokens_per_batch / seq_len rows."""
        if self.context_stages[index].get("batch_size"):
            return self.stages[index].batch_size
        return max(1, self.tokens_per_batch * self._context_parallel_of(trainer, index) // self.stages[index].seq_len)

    def _context_parallel_of(self, trainer: L.Trainer, index: int) -> int:
        """How many ranks share a row in stage ``index``."""
        size = self.context_stages[index].get("context_parallel")
        configured = getattr(trainer.strategy, "context_parallel_size", 1)
        if size is None:
            return configured
        if not isinstance(size, int) or size < 1 or configured % size:
            raise ValueError(f"context stage {index}: context_parallel={size!r} must be a positive divisor of "
                             f"strategy.context_parallel_size={configured} (use strategy=fsdp2_cp to share rows)")
        return size

    def enter_stage(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        size = self._context_parallel_of(trainer, self.stage_at(pl_module.tokens_seen))
        if hasattr(trainer.strategy, "use_context_parallel"):
            trainer.strategy.use_context_parallel(size)  # before the stage's dataloader is made
        index = super().enter_stage(trainer, pl_module)
        self._set_weights(trainer.datamodule, self.context_stages[index].get("weights"))
        if index != self._current:
            self._current = index
            spec = self.context_stages[index]
            changes = {k: spec[k] for k in ("rope_theta", "rope_scaling") if k in spec}
            model = pl_module.model
            changes["max_seq_len"] = max(model.config.max_seq_len, spec["seq_len"])
            model.set_context(**changes)
            pl_module.model_config = model.config
        return index

    def _set_weights(self, datamodule: Any, weights: dict[str, float] | None) -> None:
        """The stage's mixture weights over the configured ones (``data.sources.*.weight``)."""
        if self._base_weights is None:
            if not hasattr(datamodule, "set_weights"):
                if any("weights" in s for s in self.context_stages):
                    raise ValueError(f"context stages give mixture weights, but {type(datamodule).__name__} "
                                     "has no set_weights; use herd's PackedDataModule or drop stages[*].weights")
                return
            self._base_weights = dict(zip(datamodule.names, datamodule.weights, strict=True))
        datamodule.set_weights({**self._base_weights, **(weights or {})})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        index, go_on = self._current, True
        if pl_module.tokens_seen >= self.stage_end(index):
            go_on = self.evaluate_gate(trainer, pl_module, index) or self._handle_failure(index)
        if not go_on or pl_module.tokens_seen >= self.total_tokens:
            trainer.should_stop = True
            return
        self.enter_stage(trainer, pl_module)

    # ------------------------------------------------------------------------------ gate

    def evaluate_gate(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int) -> bool:
        """Measure the gate at the end of stage ``index``, log it, and return whether it passed."""
        seq_len = self.stages[index].seq_len
        short_loss = self.short_context_loss(trainer, pl_module)
        result = self.needle_result(trainer, pl_module, seq_len)
        ratio = short_loss / self.baseline_short_loss
        passed = ratio <= 1 + self.gate.max_short_loss_increase and result.mean >= self.gate.min_needle_accuracy
        record = {"stage": index, "seq_len": seq_len, "tokens_seen": pl_module.tokens_seen, "short_loss": short_loss,
                  "short_loss_ratio": ratio, "needle": result.mean, "passed": passed}
        self.results.append(record)
        self._log(trainer, pl_module, record, result)
        logs.info(logger, f"long context: gate of stage {index} (seq {seq_len}) {'passed' if passed else 'FAILED'}: "
                       f"short-context loss x{ratio:.3f}, needle {result.mean:.2f}\n{result.table()}")
        return passed

    def _handle_failure(self, index: int) -> bool:
        """Act on a failed gate as configured; returns whether training goes on."""
        if self.gate.on_fail == "warn":
            rank_zero_warn(f"long context: stage {index}'s gate failed; going on (gate.on_fail=warn)")
            return True
        if self.gate.on_fail == "extend" and self.extensions < self.gate.max_extensions:
            self.extensions += 1
            self._extend(index, self.gate.extend_tokens)
            logs.info(logger, f"long context: stage {index} extended by {self.gate.extend_tokens:,} tokens")
            return True
        rank_zero_warn(f"long context: stage {index}'s gate failed; stopping (gate.on_fail={self.gate.on_fail}, "
                       f"{self.extensions} extension(s) used)")
        return False

    def _extend(self, index: int, tokens: int) -> None:
        """Give stage ``index`` more tokens: every later stage starts that much later."""
        self.stages = [s if i <= index else RampStage(s.after_tokens + tokens, s.batch_size, s.seq_len)
                       for i, s in enumerate(self.stages)]
        self.total_tokens += tokens

    def short_context_loss(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Token-weighted val loss at the short (pretraining) length, over ``short_val_batches`` batches."""
        datamodule = trainer.datamodule
        long_seq_len = datamodule.seq_len
        datamodule.set_seq_len(self.short_seq_len)
        total, count = 0.0, 0
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for i, batch in enumerate(datamodule.val_dataloader()):
                    if i >= self.short_val_batches:
                        break
                    batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                    loss, n = next_token_loss(pl_module.model, batch, getattr(pl_module, "loss_chunk_size", None))
                    total, count = total + loss.item() * n.item(), count + n.item()
        finally:
            datamodule.set_seq_len(long_seq_len)
        return total / max(count, 1)

    def needle_result(self, trainer: L.Trainer, pl_module: L.LightningModule, up_to: int) -> NeedleResult:
        """Needle accuracy at the configured lengths up to ``up_to``."""
        from herd.data.tokenizer import Tokenizer

        datamodule = trainer.datamodule
        if self._tokenizer is None:  # read once, used by every gate
            self._tokenizer = Tokenizer.load(datamodule.tokenizer)
        tokenizer = self._tokenizer
        lengths = self.needle.lengths or [2**k for k in range(8, 20) if 2**k <= up_to]
        lengths = [n for n in lengths if n <= up_to] or [up_to]
        padding = datamodule.manifest.data.get("padding", {}).get("token_id")
        drop = [i for i in (tokenizer.bos_id, tokenizer.eos_id, padding) if i is not None]
        haystack = collect_haystack(datamodule.val_dataloader(), max(lengths) * 2, drop,
                                    skip_rows_with=tokenizer.encode(" pass key"))
        with trainer.precision_plugin.forward_context():
            return needle_accuracy(pl_module.model, tokenizer, haystack, lengths, self.needle.depths,
                                   self.needle.trials, self.needle.seed)

    def _log(self, trainer, pl_module, record: dict[str, Any], result: NeedleResult) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"gate/{k}": float(v) for k, v in record.items()}, step=step)
            for length in result.lengths:
                logger.log_metrics({f"needle/accuracy@{length}": result.at_length(length)}, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("needle/heatmap", result.image(), step, dataformats="HWC")
                logger.experiment.add_text("needle/table", "    " + result.table().replace("\n", "\n    "), step)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline_short_loss": self.baseline_short_loss, "extensions": self.extensions,
                "stages": [vars(s) for s in self.stages], "total_tokens": self.total_tokens, "results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline_short_loss = state_dict["baseline_short_loss"]
        self.extensions = state_dict["extensions"]
        self.stages = [RampStage(**s) for s in state_dict["stages"]]
        self.total_tokens = state_dict["total_tokens"]
        self.results = list(state_dict["results"])
        self.restored()
