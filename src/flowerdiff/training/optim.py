"""Learning-rate schedules, built as Hydra ``_partial_`` factories ``(optimizer, total_steps)``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 500, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up from 0 to the base LR, then cosine decay to ``min_lr_ratio`` x base LR.

    With ``min_lr_ratio=0`` this is the book's ``diffusers.get_scheduler("cosine", ...)``,
    factor for factor.

    ``total_steps`` counts optimizer steps (Lightning's ``estimated_stepping_batches``), so the
    shape is the same for any number of devices or gradient-accumulation factor. The schedule is
    stepped once per optimizer step.
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"lr_scheduler: warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} "
            ">= 1 (total_steps comes from trainer.max_steps or trainer.max_epochs)."
        )
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
