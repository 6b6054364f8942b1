"""Evaluate an exported model (a Hugging Face Llama directory) from the command line.

Needle in a haystack on the validation split of prepared data::

    python -m herd.evaluate model_dir=logs/tiny_long_context/runs/<run>/export
    python -m herd.evaluate model_dir=/models/Llama-3.1-8B data_dir=/data/prepared/long \\
        'lengths=[8192,32768,131072]' trials=10

Prints the depth x length accuracy table and writes it to ``<run folder>/needle.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from herd.data.datamodule import PackedDataModule
from herd.data.tokenizer import Tokenizer
from herd.evaluation.needle import NeedleResult, collect_haystack, needle_accuracy
from herd.interop import hf
from herd.model.quantize import check_quantize, quantize
from herd.paths import resolve
from herd.presets import config_dir


def evaluate_needle(cfg: DictConfig) -> NeedleResult:
    """Load the model and its tokenizer, build the haystack from ``data_dir``'s val split, score.

    ``quantize=fp8_rowwise`` scores the model with FP8 feed-forward layers (see :mod:`herd.model.quantize`).
    """
    check_quantize(cfg.get("quantize"))
    model_dir = resolve(cfg.model_dir)
    tokenizer = Tokenizer.load(cfg.tokenizer or model_dir)
    model = quantize(hf.load(model_dir, dtype=torch.float32, device=cfg.device).eval(), cfg.get("quantize"))
    lengths = [int(n) for n in cfg.lengths]
    data = PackedDataModule(str(resolve(cfg.data_dir)), seq_len=max(lengths), batch_size=1, num_workers=0,
                            expected_vocab_size=model.config.vocab_size)  # refuses another tokenizer's data
    drop = [tokenizer.bos_id, tokenizer.eos_id]
    haystack = collect_haystack(data.val_dataloader(), 2 * max(lengths), drop,
                                skip_rows_with=tokenizer.encode(" pass key"))
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    with torch.autocast(torch.device(cfg.device).type, dtype=dtype, enabled=bool(cfg.bf16)):
        return needle_accuracy(model, tokenizer, haystack, lengths, list(cfg.depths), int(cfg.trials), int(cfg.seed))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Command-line entry; errors name the file and exit with status 2."""
    try:
        result = evaluate_needle(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"herd.evaluate: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"needle in a haystack, {cfg.model_dir} (mean {result.mean:.3f}):\n{result.table()}")
    out = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir) / "needle.json"
    out.write_text(json.dumps({"model_dir": str(cfg.model_dir), "lengths": result.lengths, "depths": result.depths,
                               "accuracy": result.accuracy.tolist(), "mean": result.mean}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
