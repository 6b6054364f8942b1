"""The LR schedule against the formulas: linear warmup, cosine to a floor, linear annealing to 0."""

from __future__ import annotations

import math

import pytest
import torch

from herd.stages.schedule import WarmupCosineAnneal, warmup_cosine


def test_warmup_is_linear_to_peak():
    s = WarmupCosineAnneal(warmup_steps=10, total_steps=100)
    assert [s(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert s(10) == pytest.approx(1.0)


def test_cosine_reaches_one_percent_floor_at_total_steps():
    s = WarmupCosineAnneal(warmup_steps=10, total_steps=110, min_lr_ratio=0.01)
    assert s(110) == pytest.approx(0.01)
    midpoint = 10 + 50
    assert s(midpoint) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_annealing_falls_linearly_to_zero_over_the_final_steps():
    s = WarmupCosineAnneal(warmup_steps=0, total_steps=100, min_lr_ratio=0.1, anneal_steps=20)
    assert s.anneal_start == 80
    at_start = s.cosine(80)
    assert s(80) == pytest.approx(at_start)
    assert s(90) == pytest.approx(at_start * 0.5)
    assert s(100) == pytest.approx(0.0)
    assert s(79) == pytest.approx(s.cosine(79))


def test_scheduler_drives_the_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2.0)
    scheduler = warmup_cosine(optimizer, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[5] < lrs[4] <= 2.0


@pytest.mark.parametrize("kwargs", [{"total_steps": 0}, {"total_steps": 10, "anneal_steps": 11},
                                    {"total_steps": 10, "min_lr_ratio": 2.0}])
def test_bad_schedules_are_refused_with_the_key(kwargs):
    with pytest.raises(ValueError, match="stage.scheduler"):
        WarmupCosineAnneal(warmup_steps=1, **kwargs)
