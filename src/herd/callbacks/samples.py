"""Greedy continuations of fixed prompts, logged to TensorBoard as text every N steps."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from herd.data.tokenizer import Tokenizer
from herd.model import generate
from herd.stages.parallelize import is_sharded


class TextSamples(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), continue the prompts greedily (one batch).

    ``tokenizer`` is a tokenizer directory (the one the data was prepared with).
    """

    def __init__(
        self, tokenizer: str, prompts: Sequence[str], every_n_steps: int = 200, max_new_tokens: int = 48
    ) -> None:
        self.tokenizer_path = tokenizer
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self._tokenizer: Tokenizer | None = None
        self._last_step: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.tokenizer_path is None:
            self.tokenizer_path = getattr(trainer.datamodule, "tokenizer", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Generate and write one text entry per prompt at the current step (rank 0 writes).

        A sharded model (FSDP2) computes only with every rank taking part, so then every rank
        generates the same continuations; otherwise rank 0 alone does.
        """
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not self.prompts or self.tokenizer_path is None:
            return
        if rank_zero_only.rank != 0 and not is_sharded(pl_module.model):
            return
        texts = self.complete(pl_module.model)
        if rank_zero_only.rank != 0:
            return
        for i, text in enumerate(texts):
            for logger in loggers:
                logger.experiment.add_text(f"samples/{i}", text, global_step=trainer.global_step)

    def complete(self, model) -> list[str]:
        """The greedy continuation of every prompt, as ``prompt`` + continuation text."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        tok = self._tokenizer
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        texts = []
        try:
            prompts = [torch.tensor(tok.with_bos(tok.encode(prompt)), device=device) for prompt in self.prompts]
            outputs = generate(model, prompts, self.max_new_tokens, stop_ids=[tok.eos_id])  # one batch
            for prompt, new_tokens in zip(self.prompts, outputs, strict=True):
                continuation = tok.decode(new_tokens)
                # An indented block renders verbatim in TensorBoard's markdown (code keeps its layout).
                texts.append("\n".join("    " + line for line in (prompt + continuation).splitlines()))
        finally:
            model.train(was_training)
        return texts
