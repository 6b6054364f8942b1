"""MFU of the Llama 3.2 1B preset on one GPU: bf16, torch.compile per block, FSDP2, seq 8192.

Runs the real training path (the stage's configure_model applies FSDP2 and compile; Lightning's
ModelParallelStrategy on one device) on synthetic batches, and prints model FLOP utilisation
(6N + 12 * layers * dim * seq per token, the paper's formula) against the GPU's dense bf16 peak,
next to an eager run without compile measured in the same process. Needs a CUDA GPU.

    python bench/gpu_mfu.py                      # 1B, seq 8192, batch 1, 30 steps
    python bench/gpu_mfu.py --batch 2 --steps 50 --no-baseline
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from herd.callbacks.throughput import peak_flops
from herd.data.loaders.synthetic import SyntheticDataModule
from herd.presets import model_preset
from herd.stages.parallelize import model_parallel_strategy
from herd.stages.pretrain import PretrainStage


class StepTimer(L.Callback):
    """Wall time of each optimizer step after warm-up (synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


def run(args, compile_blocks: bool) -> float:
    """Median tokens/s of one configuration (FSDP2 computes in bf16; master weights stay fp32)."""
    config = model_preset(args.preset)
    stage = PretrainStage(model=config, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True),
                          compile_blocks=compile_blocks, activation_checkpointing=args.ac,
                          loss_chunk_size=args.loss_chunk,
                          fsdp={"param_dtype": "bf16", "reduce_dtype": "fp32", "reshard_after_forward": False})
    data = SyntheticDataModule(vocab_size=config.vocab_size, seq_len=args.seq, batch_size=args.batch)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, precision="32-true", strategy=model_parallel_strategy(
        data_parallel_size=1, tensor_parallel_size=1), max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(stage, datamodule=data)
    step = sorted(timer.times)[len(timer.times) // 2]
    return args.batch * args.seq / step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ac", default="none", help="activation checkpointing: none, full or k")
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--accelerator", default="gpu", help="cpu only smoke-tests the script (tiny preset)")
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_mfu.py needs a CUDA GPU (--accelerator cpu only smoke-tests it)")
    config = model_preset(args.preset)
    peak, _ = peak_flops(torch.device("cuda" if args.accelerator == "gpu" else "cpu"))
    flops_per_token = config.flops_per_token(args.seq)
    device_name = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    print(f"{device_name} (peak {peak / 1e12:.0f} TFLOP/s bf16); {args.preset} "
          f"{config.num_params() / 1e9:.2f}B params; seq {args.seq} x batch {args.batch}; FSDP2, bf16")
    results = {"compiled": run(args, compile_blocks=True)}
    if not args.no_baseline:
        results["eager"] = run(args, compile_blocks=False)
    for name, tokens_per_s in results.items():
        mfu = tokens_per_s * flops_per_token / peak
        print(f"  {name:<9} {tokens_per_s:>10,.0f} tok/s   MFU {mfu:6.1%}   "
              + (f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""))
    if "eager" in results:
        print(f"compiled / eager: {results['compiled'] / results['eager']:.2f}x; target MFU >= 50% "
              "(the paper: 38-43% on 16K H100s)")


if __name__ == "__main__":
    main()
