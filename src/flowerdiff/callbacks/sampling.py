"""Shared timing for callbacks that sample during validation with the weights it uses.

Lightning's ``EMAWeightAveraging`` swaps the EMA weights in at *its* ``on_validation_epoch_start``
and back at *its* ``on_validation_epoch_end``; callbacks run in list order. A callback listed after
EMA therefore sees the EMA weights at its epoch start, one listed before it at its epoch end. This
base class picks the right hook, so the order in ``callbacks:`` does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, WeightAveraging

from flowerdiff.diffusion import Sampler, build_sampler


class ValidationSamplingCallback(Callback):
    """Calls :meth:`run` once per due validation epoch, while the EMA weights (if any) are in."""

    def __init__(self, sampler: Mapping[str, Any] | None, num_inference_steps: int | None) -> None:
        super().__init__()
        # Built now, so a bad sampler config fails when the callback is made, not mid-training.
        self.sampler = build_sampler(dict(sampler)) if sampler else None
        if num_inference_steps is not None:
            Sampler(num_inference_steps=num_inference_steps)  # the constructor checks it
        self.num_inference_steps = num_inference_steps
        self.has_ema = False
        self.ema_first = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks
        ema = [i for i, c in enumerate(callbacks) if isinstance(c, WeightAveraging)]
        self.has_ema = bool(ema)
        self.ema_first = self.has_ema and ema[0] < callbacks.index(self)

    def should_run(self, trainer: L.Trainer) -> bool:
        raise NotImplementedError

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema_first and self.should_run(trainer):
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.ema_first and self.should_run(trainer):
            self.run(trainer, pl_module)

    def sampler_for(self, pl_module: L.LightningModule) -> Sampler:
        """The configured sampler (else the module's), with the step count override applied;
        a new object: the module's own sampler is never changed."""
        sampler = self.sampler or pl_module.diffusion.sampler
        if self.num_inference_steps is not None:
            sampler = sampler.with_options(num_inference_steps=self.num_inference_steps)
        return sampler
