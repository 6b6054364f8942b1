"""Tokens per second and model FLOPs utilisation (MFU), logged every step."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch

from herd import logs
from herd.data.loaders.ranks import data_parallel_size

logger = logs.get_logger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s`` (global) and ``train/mfu``.

    MFU = model FLOPs per token (6N + 12 * layers * dim * seq, the paper's formula) x tokens/s,
    divided by ``peak_flops_per_device`` x number of devices. With ``None`` the peak is the dense
    bf16 figure of a known GPU, or on a CPU the best of several bf16 matmul measurements, taken once
    per machine and cached (see :func:`cpu_peak_flops`). The log says which peak was used.
    """

    def __init__(self, peak_flops_per_device: float | None = None, window: int = 10) -> None:
        self.peak_flops_per_device = peak_flops_per_device
        self.window = window
        self._times: list[float] = []
        self._tokens: list[int] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.peak_flops_per_device is not None:
            where = "callbacks.throughput.peak_flops_per_device"
        else:
            self.peak_flops_per_device, where = peak_flops(pl_module.device)
        if self.peak_flops_per_device:
            logs.info(logger, f"MFU is relative to {self.peak_flops_per_device / 1e12:.2f} TFLOP/s per device ({where})")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append(time.perf_counter() - self._start)
        self._tokens.append(batch["tokens"].numel() * data_parallel_size(trainer))  # whole rows per replica
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


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The bf16 peak of ``device`` and where it comes from: a table for known GPUs, a cached measurement on a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)
        return peak, f"the dense bf16 peak of {name}" if peak else f"{name} is not in herd's table: no MFU"
    if device.type != "cpu":
        return None, f"no peak known for {device.type}"
    return cpu_peak_flops()


def cpu_peak_flops(cache: Path | None = None) -> tuple[float, str]:
    """This CPU's bf16 matmul throughput, measured once per machine and thread count, then cached.

    A single short measurement varies several-fold on a busy machine, so the cached figure is the
    best of several rounds. The cache is ``$XDG_CACHE_HOME/herd/cpu_peak_flops.json`` (default
    ``~/.cache``); delete it to measure again.
    """
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "herd" / "cpu_peak_flops.json"
    key = f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), int | float) and known[key] > 0:
        return float(known[key]), f"measured once on this machine, cached in {cache}"
    peak = measure_cpu_peak_flops()
    known = known if isinstance(known, dict) else {}
    known[key] = peak
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, cache)
        where = f"measured now and cached in {cache}"
    except OSError:
        where = "measured now (the cache folder is not writable)"
    return peak, where


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 8, rounds: int = 5) -> float:
    """Best FLOP/s of ``rounds`` rounds of ``repeats`` bf16 matmuls of ``size`` x ``size``."""
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b  # warm up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
