"""One optimizer step of each stage on eight fixed rows of different token counts, however the rows are
split: one batch of 8, 8 accumulated micro-batches of 1, or (run as a script under torchrun) 2 ranks x
4 accumulated micro-batches of 1.

The rows are built so that weighting them by row instead of by what each loss averages (target
tokens, pairs, chosen tokens, prompts) changes the update: their counts differ several-fold.

    PYTHONPATH=tests python -m torch.distributed.run --nproc-per-node 2 -m helpers.invariance START_DIR OUT_DIR

writes OUT_DIR/<stage>.pt (rank 0): the parameters after one step on 2 ranks x 4 micro-batches.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from helpers.training import preference_batch, response_tokens

STAGES = ("pretrain", "sft", "dpo", "reward", "vision_adapter")
VOCAB = 97
SEQ = 24
PREFERENCE_SEQ = 48
SEED = 7
OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1.0, eps=1.0, weight_decay=0.0)
# eps=1 >> |gradient|: Adam's first step is then ~ -lr * gradient, not ~ -lr * sign(gradient), so a
# wrongly weighted gradient shows in the parameters (with eps=1e-8 the first step hides its scale).


def small_config():
    """The tests' model shape (as the conftest's ``small_config``)."""
    from herd.model import ModelConfig

    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=256)


def save_start(folder: Path) -> Path:
    """The start model of the stages that need one (SFT, DPO, reward)."""
    from herd.interop import hf
    from herd.model import Transformer

    torch.manual_seed(SEED)
    return hf.save(Transformer(small_config()), folder)


# ------------------------------------------------------------------------------------------ rows


def _text_row(generator: torch.Generator, scored: int, prompt: int) -> dict[str, torch.Tensor]:
    """One (1, SEQ) row: ``prompt`` unscored positions, then ``scored`` targets, then padding (unscored)."""
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=generator)
    targets = torch.full((1, SEQ), -100)
    targets[0, prompt : prompt + scored] = torch.roll(tokens, -1, dims=1)[0, prompt : prompt + scored]
    document_ids = torch.zeros(1, SEQ, dtype=torch.long)
    document_ids[0, prompt + scored + 1 :] = 1  # the padding is a document of its own
    return {"tokens": tokens, "document_ids": document_ids, "targets": targets}


def _preference_row(generator: torch.Generator, shape: list[list[int]]) -> dict[str, torch.Tensor]:
    """One row of groups; ``shape`` lists each group's responses by content length (ranks 0, 1, 2, ...)."""
    def ids(n):
        return torch.randint(10, VOCAB, (n,), generator=generator).tolist()

    groups = [(ids(3), [(*response_tokens(ids(n)), rank) for rank, n in enumerate(lengths)]) for lengths in shape]
    return preference_batch([groups], seq=PREFERENCE_SEQ)


def _caption_row(generator: torch.Generator, caption: int) -> dict[str, torch.Tensor]:
    tokens = torch.zeros(1, SEQ, dtype=torch.long)
    tokens[0, 0], tokens[0, 1] = VOCAB, 1  # <|image|>, <|begin_of_text|>
    tokens[0, 2 : 2 + caption] = torch.randint(3, VOCAB, (caption,), generator=generator)
    targets = torch.full((1, SEQ), -100)
    targets[0, 1 : 1 + caption] = tokens[0, 2 : 2 + caption]
    return {"tokens": tokens, "targets": targets, "pixel_values": torch.randn(1, 1, 3, 16, 16, generator=generator),
            "aspect_ratio_ids": torch.tensor([1]), "num_tiles": torch.tensor([1]), "image_rows": torch.tensor([0])}


def rows(stage: str) -> list[dict[str, torch.Tensor]]:
    """Eight single-row batches of ``stage``'s kind whose loss counts differ several-fold."""
    generator = torch.Generator().manual_seed(SEED)
    if stage in ("pretrain", "sft"):
        scored = [2, 20, 5, 13, 1, 22, 9, 4]
        prompts = [0, 0, 3, 1, 0, 0, 6, 0] if stage == "pretrain" else [12, 2, 9, 5, 18, 1, 10, 15]
        return [_text_row(generator, min(n, SEQ - 1 - p), p) for n, p in zip(scored, prompts, strict=True)]
    if stage in ("dpo", "reward"):  # pairs, chosen tokens and prompts all vary
        shapes = [[[2, 1]], [[9, 3, 6]], [[1, 2], [4, 7]], [[12, 2]], [[3, 3, 3]], [[1, 1]], [[6, 2], [2, 8, 1]],
                  [[5, 9]]]
        return [_preference_row(generator, shape) for shape in shapes]
    if stage == "vision_adapter":
        return [_caption_row(generator, n) for n in (2, 15, 4, 21, 1, 9, 6, 18)]
    raise ValueError(stage)


def collate(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate single-row batches (``image_rows`` renumbered)."""
    out = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    if "image_rows" in out:
        out["image_rows"] = torch.arange(len(batches))
    return out


# ---------------------------------------------------------------------------------------- a step


class FixedBatches(L.LightningDataModule):
    """Serves the given batches in order, as a train loader (and the DPO precompute's pass)."""

    image_token_id = VOCAB

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def pass_dataloader(self, split: str = "train", batch_size: int | None = None):
        return (DataLoader(self.batches, batch_size=None), len(self.batches)) if split == "train" else ([], 0)

    def set_tiler(self, tiler) -> None:
        """The vision adapter's hook; the rows are already tiled."""


class _Prepare(L.Callback):
    """Seeds the stage's random initialisation (value head, adapter) the same way in every run; opens
    the vision adapter's gates so that the whole adapter gets a gradient."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(SEED)

    def on_fit_start(self, trainer, pl_module):
        with torch.no_grad():
            for block in getattr(pl_module.model, "cross_layers", []):
                block.attention_gate.fill_(0.5)
                block.ffn_gate.fill_(0.5)


def make_stage(stage: str, start: Path | None):
    """A fresh stage of kind ``stage`` with :data:`OPTIMIZER` and no schedule."""
    from herd.stages.dpo import DPOStage
    from herd.stages.pretrain import PretrainStage
    from herd.stages.reward import RewardStage
    from herd.stages.sft import SFTStage
    from herd.stages.vision_adapter import VisionAdapterStage

    common = {"model": small_config(), "optimizer": OPTIMIZER, "scheduler": None}
    if stage == "pretrain":
        torch.manual_seed(SEED)
        return PretrainStage(**common)
    if stage == "sft":
        return SFTStage(**common, init_from=str(start))
    if stage == "dpo":
        return DPOStage(**common, init_from=str(start))  # reference: precompute
    if stage == "reward":
        return RewardStage(**common, init_from=str(start))
    vision = {"image_size": 16, "patch_size": 4, "dim": 32, "n_layers": 2, "n_global_layers": 1, "n_heads": 4,
              "ffn_dim": 64, "feature_layers": [0], "cross_attention_every": 1}
    return VisionAdapterStage(**common, vision=vision, init_from=str(start))


def step_parameters(stage: str, start: Path | None, batches: list[dict[str, torch.Tensor]], accumulate: int,
                    **trainer_options) -> dict[str, torch.Tensor]:
    """The stage's parameters after one optimizer step over ``batches`` (accumulated ``accumulate`` at a time)."""
    module = make_stage(stage, start)
    trainer = L.Trainer(accelerator="cpu", devices=trainer_options.pop("devices", 1), max_steps=1,
                        accumulate_grad_batches=accumulate, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[_Prepare()], **trainer_options)
    trainer.fit(module, datamodule=FixedBatches(batches))
    assert trainer.global_step == 1
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def main(start: str, out: str) -> None:
    """2 ranks x 4 accumulated micro-batches of 1 (gloo), every stage; rank 0 saves the parameters."""
    import os

    rank = int(os.environ["RANK"])
    for stage in STAGES:
        mine = rows(stage)[4 * rank : 4 * rank + 4]
        params = step_parameters(stage, Path(start), mine, accumulate=4, devices=2, strategy="ddp")
        if rank == 0:
            torch.save(params, Path(out) / f"{stage}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
