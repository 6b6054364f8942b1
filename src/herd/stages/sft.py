"""Supervised fine-tuning (SFT): the pretraining loss on dialog rows whose targets are the assistant's tokens.

Dialog data (``herd.prepare`` with a dialog source, e.g. the embedded ``stdlib:sft``) is packed
several dialogs to a row with document ids, and its ``targets`` are -100 everywhere except on the
tokens the assistant wrote (content plus its ``<|eot_id|>``/``<|eom_id|>``). Next-token prediction
on those targets *is* SFT, so this stage is :class:`~herd.stages.pretrain.PretrainStage` started
from a model directory: ``val/loss`` is the loss on held-out assistant tokens and ``val/accuracy``
their greedy next-token accuracy. Answers to held-out questions are generated and scored by
``callbacks.answers`` (see :mod:`herd.callbacks.answers`).
"""

from __future__ import annotations

from herd.stages.pretrain import PretrainStage


class SFTStage(PretrainStage):
    """PretrainStage that must start from a model directory (``stage.init_from``)."""

    continues_model = True
    stage_name = "sft"
    starts_from = ("the model to fine-tune, e.g. the export of a pretraining run (logs/pretrain/runs/<run>/export) "
                   "or a Llama 3 checkpoint folder")
