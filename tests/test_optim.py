"""The LR schedule: warm-up then cosine, counted in optimizer steps."""

import itertools
import math

import pytest
import torch

from flowerdiff.training.optim import warmup_cosine


def lrs(total: int, warmup: int, min_lr_ratio: float = 0.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_cosine(optimizer, total, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    values = []
    for _ in range(total):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_warmup_is_linear_from_zero_then_cosine_to_zero() -> None:
    values = lrs(total=110, warmup=10)
    assert values[:3] == pytest.approx([0.0, 0.2, 0.4])
    assert values[10] == pytest.approx(2.0)
    # Half-way through the decay the cosine is at half the base LR.
    assert values[60] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


def test_min_lr_ratio_is_the_floor() -> None:
    values = lrs(total=50, warmup=0, min_lr_ratio=0.1)
    assert values[0] == pytest.approx(2.0)
    assert min(values) >= 0.2 - 1e-9
    assert values[-1] == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 49 / 50)))


def test_warmup_longer_than_the_run_is_shortened_to_the_run() -> None:
    values = lrs(total=5, warmup=10)
    assert values == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6])


def test_bad_lengths_are_rejected_with_the_key() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        warmup_cosine(optimizer, 10, warmup_steps=-1)


def test_the_config_builds_the_schedule_the_module_uses(tiny_config) -> None:
    """conf/lr_scheduler/warmup_cosine.yaml is a partial the module calls with the total steps."""
    from flowerdiff.infra.config import build_module

    module = build_module(tiny_config("lr_scheduler.warmup_steps=4", "optimizer.lr=0.5"))
    optimizer = module.optimizer_factory(params=module.net.parameters())
    scheduler = module.lr_scheduler_factory(optimizer, 8)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:5] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    assert seen[5] < 0.5 and seen == sorted(seen[:5]) + sorted(seen[5:], reverse=True)
