"""Greedy answers to held-out questions at every validation: ``val/answer_f1`` and a TensorBoard text tab.

For chat stages (``stage=sft``): after each validation (the one before training included) the
model answers ``count`` held-out questions greedily in the Llama 3 chat format; the mean token F1
against the reference answers is logged as ``val/answer_f1`` (see :mod:`herd.evaluation.answers`)
and the first ``show`` answers appear as text next to their questions and references.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from herd import logs
from herd.data.chat import ChatFormat, chat_format
from herd.data.tokenizer import Tokenizer
from herd.evaluation.answers import HeldOut, answer_f1, held_out_dialogs

logger = logs.get_logger(__name__)


class AnswerSamples(L.Callback):
    """See the module docstring. ``dialogs``: ``stdlib:sft`` or a jsonl of held-out dialogs.

    ``chat_template`` picks the chat format of the questions (see :func:`herd.data.chat.chat_format`).
    ``val_fraction`` must be the one the data was prepared with (None: read from the data's manifest),
    so that the questions come from the modules held out of training.
    """

    def __init__(self, dialogs: str = "stdlib:sft", count: int = 32, show: int = 4, max_new_tokens: int = 64,
                 batch_size: int = 16, val_fraction: float | None = None, tokenizer: str | None = None,
                 chat_template: str = "auto") -> None:
        if count < 1 or show < 0 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("callbacks.answers: count, max_new_tokens and batch_size must be >= 1, show >= 0")
        self.dialogs, self.count, self.show = dialogs, count, show
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.val_fraction, self.tokenizer_path, self.chat_template = val_fraction, tokenizer, chat_template
        self._held_out: list[HeldOut] | None = None
        self._chat: ChatFormat | None = None
        self.last_f1: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if self.tokenizer_path is None:
            self.tokenizer_path = getattr(datamodule, "tokenizer", None)
        if self.val_fraction is None:
            manifests = getattr(datamodule, "manifests", None) or {}
            self.val_fraction = next((float(m.data.get("val_fraction", 0.02)) for m in manifests.values()), 0.02)
        if self.tokenizer_path is None:
            raise ValueError("callbacks.answers needs a tokenizer: the data's, or callbacks.answers.tokenizer=<folder>")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._held_out is None:
            self._held_out = held_out_dialogs(self.dialogs, self.count, self.val_fraction)
            self._chat = chat_format(Tokenizer.load(self.tokenizer_path), self.chat_template)
        if not self._held_out:
            return
        # every rank answers (a sharded model needs all of them for each forward pass)
        f1, answers = answer_f1(pl_module.model, self._chat, self._held_out, self.max_new_tokens,
                                self.batch_size)
        self.last_f1 = f1
        pl_module.log("val/answer_f1", f1, sync_dist=False)
        if trainer.is_global_zero:
            self._write_text(trainer, answers)

    def _write_text(self, trainer: L.Trainer, answers: list[str]) -> None:
        for run_logger in trainer.loggers:
            if not isinstance(run_logger, TensorBoardLogger):
                continue
            for index, (held, text) in enumerate(zip(self._held_out[: self.show], answers, strict=False)):
                question = held.prompt[-1]["content"]
                entry = (f"**question:** {question}\n\n**answer:** {text}\n\n**reference:** {held.reference}")
                run_logger.experiment.add_text(f"answers/{index}", entry, global_step=trainer.global_step)
