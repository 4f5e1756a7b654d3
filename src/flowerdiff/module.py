"""DiffusionModule: the training/validation steps and one pure ``sample()`` for everyone else."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from flowerdiff.diffusion import (
    DiffusionLoss,
    NoiseSchedule,
    Sampler,
    SamplerOutput,
    make_generators,
    randn_per_image,
)

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]


class DiffusionModule(L.LightningModule):
    """Denoising diffusion around any noise-predicting network ``net(x_t, t)``.

    Callbacks (FID, image grids) never reach inside: they call :meth:`sample`, which is pure
    (seeded, no logging, no state change), and log what it returns themselves.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        loss: DiffusionLoss,
        sampler: Sampler,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        prediction: str = "epsilon",
        image_size: int = 64,
        in_channels: int = 3,
        val_num_timesteps: int = 10,
        val_seed: int = 1234,
        compile: bool = False,
        channels_last: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.loss = loss
        self.sampler = sampler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.prediction = prediction
        self.image_shape = (in_channels, image_size, image_size)
        self.val_seed = val_seed
        self.channels_last = channels_last
        # The validation loss is measured at these fixed timesteps with fixed noise per image,
        # so it is comparable across epochs and runs (a random t would make it jitter).
        grid = torch.linspace(0, schedule.num_timesteps - 1, val_num_timesteps).round().long()
        self.register_buffer("val_timesteps", grid, persistent=False)
        # Everything needed to rebuild this module from a checkpoint without pickled objects.
        self.config = config or {}
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()

    # -- the network ----------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return self.net(x_t, t)

    def diffusion_loss(self, images: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        x_t = self.schedule.add_noise(images, noise, t)
        return self.loss(self(x_t, t), images, noise, t, self.schedule, self.prediction)

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, _ = batch
        t = torch.randint(0, self.schedule.num_timesteps, (images.shape[0],), device=self.device)
        loss = self.diffusion_loss(images, torch.randn_like(images), t)
        # No sync_dist: an all-reduce on every step would stall multi-GPU training for a log
        # line; the logged value is rank zero's loss, an unbiased estimate of the global one.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, indices = batch
        t = self.val_timesteps[indices % len(self.val_timesteps)]
        generators = [make_generators(self.val_seed, int(i), 1)[0] for i in indices]
        noise = randn_per_image(images.shape, generators, images.device, images.dtype)
        loss = self.diffusion_loss(images, noise, t)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Log the total gradient norm (before clipping): the first sign of a diverging run."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError("DiffusionModule was built without an optimizer config: cannot train.")
        optimizer = self.optimizer_factory(params=self.net.parameters(), **self._fused_kwargs())
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_scheduler_factory(optimizer, total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _fused_kwargs(self) -> dict[str, bool]:
        """``fused=True`` on CUDA (one kernel for all parameters, not a loop over them) unless the
        optimizer config sets ``fused`` itself; the CPU keeps the default implementation."""
        factory = self.optimizer_factory
        if self.device.type != "cuda" or "fused" in getattr(factory, "keywords", {}):
            return {}
        return {"fused": True} if "fused" in inspect.signature(factory).parameters else {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["flowerdiff_config"] = self.config

    # -- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_images: int,
        seed: int = 0,
        start_index: int = 0,
        sampler: Sampler | None = None,
        return_intermediates: bool = False,
        progress: bool = False,
    ) -> SamplerOutput:
        """Generate images ``start_index .. start_index + num_images`` of the seeded sequence.

        Each image has its own CPU generator seeded from ``(seed, index)``, so any split into
        batches or ranks, on any device, yields the same images.
        """
        generators = make_generators(seed, start_index, num_images)
        noise = randn_per_image((num_images, *self.image_shape), generators, self.device)
        return (sampler or self.sampler).sample(
            self,
            self.schedule,
            noise,
            prediction_type=self.prediction,
            generators=generators,
            return_intermediates=return_intermediates,
            progress=progress,
        )
