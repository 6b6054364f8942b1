"""Tokens per second and model FLOPs utilisation (MFU), logged every step."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s`` (global) and ``train/mfu``.

    MFU = model FLOPs per token (6N + 12 * layers * dim * seq, the paper's formula) x tokens/s,
    divided by ``peak_flops_per_device`` x number of devices. With ``None`` the peak is the dense
    bf16 figure of a known GPU, or on a CPU a bf16 matmul measured once at the start of training.
    """

    def __init__(self, peak_flops_per_device: float | None = None, window: int = 10) -> None:
        self.peak_flops_per_device = peak_flops_per_device
        self.window = window
        self._times: list[float] = []
        self._tokens: list[int] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.peak_flops_per_device is None:
            self.peak_flops_per_device = peak_flops(pl_module.device)
            rank_zero_info(f"MFU is relative to {self.peak_flops_per_device / 1e12:.2f} TFLOP/s per device")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append(time.perf_counter() - self._start)
        self._tokens.append(batch["tokens"].numel() * trainer.world_size)
        self._times, self._tokens = self._times[-self.window :], self._tokens[-self.window :]
        tokens_per_s = sum(self._tokens) / max(sum(self._times), 1e-9)
        pl_module.log("train/tokens_per_s", tokens_per_s, on_step=True, on_epoch=False)
        if self.peak_flops_per_device:
            seq_len = batch["tokens"].shape[1]
            flops = pl_module.model_config.flops_per_token(seq_len) * tokens_per_s
            pl_module.log(
                "train/mfu",
                flops / (self.peak_flops_per_device * trainer.world_size),
                on_step=True,
                on_epoch=False,
            )


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of ``device``: a table for known GPUs, a short matmul measurement on a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)
    if device.type != "cpu":
        return None
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    b = torch.randn(1024, 1024, dtype=torch.bfloat16)
    a @ b  # warm up
    start, repeats = time.perf_counter(), 8
    for _ in range(repeats):
        a @ b
    return 2 * 1024**3 * repeats / (time.perf_counter() - start)
