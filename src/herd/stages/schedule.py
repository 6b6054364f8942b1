"""Learning-rate schedule of Llama 3 pretraining: linear warmup, cosine to a floor, linear annealing to 0."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineAnneal:
    """LR multiplier for step ``s`` (call it with the step; LambdaLR does).

    - steps ``[0, warmup_steps)``: linear from 1/warmup_steps to 1;
    - then cosine from 1 to ``min_lr_ratio`` at ``total_steps`` (the paper: 1% of peak);
    - the final ``anneal_steps`` (if any) fall linearly from the cosine's value there to 0, as in
      Llama 3's annealing on the last 40M tokens.
    """

    def __init__(
        self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.01, anneal_steps: int = 0
    ):
        if total_steps <= 0:
            raise ValueError(
                f"stage.scheduler.total_steps must be > 0 (or trainer.max_steps set), got {total_steps}"
            )
        if not 0 <= anneal_steps <= total_steps:
            raise ValueError(
                f"stage.scheduler.anneal_steps={anneal_steps} must lie in [0, total_steps={total_steps}]"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"stage.scheduler.min_lr_ratio={min_lr_ratio} must lie in [0, 1]")
        self.warmup_steps, self.total_steps = max(0, warmup_steps), total_steps
        self.min_lr_ratio, self.anneal_steps = min_lr_ratio, anneal_steps

    @property
    def anneal_start(self) -> int | None:
        """First step of the annealing phase, or None without one."""
        return self.total_steps - self.anneal_steps if self.anneal_steps else None

    def cosine(self, step: int) -> float:
        """Warmup then cosine, ignoring annealing."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        start = self.anneal_start
        if start is None or step < start:
            return self.cosine(step)
        return self.cosine(start) * max(0.0, (self.total_steps - step) / self.anneal_steps)


def warmup_cosine(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.01,
    anneal_steps: int = 0,
) -> LambdaLR:
    """A per-step LambdaLR over :class:`WarmupCosineAnneal` (configs give it as a ``_partial_``)."""
    return LambdaLR(optimizer, WarmupCosineAnneal(warmup_steps, total_steps, min_lr_ratio, anneal_steps))
