"""DiffusionModule: a network and a Diffusion, trained by Lightning, sampled by everyone else.

The module knows nothing of the noise process: the loss, the validation levels and sampling are
the :class:`~flowerdiff.diffusion.Diffusion`'s. Callbacks (FID, image grids) never reach inside:
they call :meth:`DiffusionModule.sample`, which is pure (seeded, no logging, no state change).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from flowerdiff.diffusion import (
    Denoiser,
    Diffusion,
    Sampler,
    SamplerOutput,
    make_generators,
    randn_per_image,
)
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.training.spec import ModelSpec

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]
CHECKPOINT_KEY = "flowerdiff"


class DiffusionModule(L.LightningModule):
    """Train ``net`` under ``diffusion``; sample it with seeded, per-image noise.

    Args:
        net: any network ``net(x, t, class_labels)`` (a U-Net preset).
        diffusion: the process (loss, parametrisation, default sampler).
        image_shape: [C, H, W] of the images it makes.
        spec: what rebuilds this model (stored in every checkpoint); None for a module that is
            never saved (e.g. the analytic oracle's).
        optimizer, lr_scheduler: ``_partial_`` factories (training only).
        compile, channels_last: speed options for the network (not part of the model).
        label_dropout: probability of replacing a training label by the null class, so one
            network learns the conditional and the unconditional model (classifier-free
            guidance).
        val_seed: seeds the validation noise of each image.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: Diffusion,
        image_shape: Sequence[int],
        spec: ModelSpec | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        compile: bool = False,
        channels_last: bool = False,
        label_dropout: float = 0.0,
        val_seed: int = 1234,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(
                f"`model.label_dropout={label_dropout}` must be in [0, 1): the share of training "
                "labels replaced by the null class (0.1 is the usual choice)."
            )
        self.net = net
        self.diffusion = diffusion
        self.image_shape = tuple(int(v) for v in image_shape)
        self.spec = spec
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.channels_last = channels_last
        self.label_dropout = float(label_dropout)
        self.val_seed = val_seed
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()

    @classmethod
    def from_spec(cls, spec: ModelSpec, **options: Any) -> DiffusionModule:
        """Build the network and the diffusion a spec names (by registry name)."""
        return cls(spec.build_network(), spec.build_diffusion(), spec.image_shape, spec, **options)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    # -- the network ------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if class_labels is None:  # unconditional networks take two arguments
            return self.net(x, t)
        return self.net(x, t, class_labels)

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, _, labels = _unpack(batch)
        loss = self.diffusion.loss(self, images, self.drop_labels(labels))
        # No sync_dist: an all-reduce on every step would stall multi-GPU training for a log
        # line; the logged value is rank zero's loss, an unbiased estimate of the global one.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def drop_labels(self, labels: Tensor | None) -> Tensor | None:
        """Replace a ``label_dropout`` share of the labels by the null class."""
        if labels is None or self.label_dropout == 0 or self.num_classes is None:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, indices, labels = _unpack(batch)
        generators = [make_generators(self.val_seed, int(i), 1)[0] for i in indices]
        noise = randn_per_image(images.shape, generators, images.device, images.dtype)
        levels = self.diffusion.validation_levels(indices)
        loss = self.diffusion.loss(self, images, labels, noise=noise, levels=levels)
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
        # The network and whatever the diffusion process learns (EDM2's loss weighting head).
        optimizer = self.optimizer_factory(params=self.parameters(), **self._fused_kwargs())
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_scheduler_factory(optimizer, total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _fused_kwargs(self) -> dict[str, bool]:
        trainer = self._trainer  # None outside fit: no precision or clipping to avoid
        precision = trainer.precision if trainer is not None else None
        clipping = trainer is not None and bool(trainer.gradient_clip_val)
        return fused_kwargs(self.optimizer_factory, self.device, precision, clipping)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.spec is None:
            raise ValueError("This DiffusionModule has no ModelSpec, so it cannot be saved.")
        checkpoint[CHECKPOINT_KEY] = self.spec.to_dict()

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_images: int,
        seed: int = 0,
        start_index: int = 0,
        sampler: Sampler | None = None,
        class_labels: Tensor | None = None,
        guidance: Guidance | None = None,
        return_intermediates: bool = False,
        progress: bool = False,
    ) -> SamplerOutput:
        """Generate images ``start_index .. start_index + num_images`` of the seeded sequence.

        Each image has its own CPU generator seeded from ``(seed, index)``, so any split into
        batches or ranks, on any device, yields the same images. ``class_labels`` [B] and
        ``guidance`` apply to conditional models.
        """
        generators = make_generators(seed, start_index, num_images)
        noise = randn_per_image((num_images, *self.image_shape), generators, self.device)
        denoiser = self.denoiser(class_labels, guidance)
        return self.diffusion.sample(
            denoiser,
            noise,
            sampler=sampler,
            generators=generators,
            return_intermediates=return_intermediates,
            progress=progress,
        )

    def denoiser(
        self, class_labels: Tensor | None = None, guidance: Guidance | None = None
    ) -> Denoiser:
        """What samplers (and the editing operations) call: ``(x, level) -> x0``, conditional
        on ``class_labels`` [B] for a conditional model, guided when ``guidance`` is given."""
        if class_labels is None:
            if guidance is not None:
                raise ValueError("Guidance needs class labels (a class-conditional model).")
            return self.diffusion.denoiser(self)
        labels = self.check_labels(class_labels).to(self.device)
        if guidance is None:
            return self.diffusion.denoiser(self, labels)
        assert self.num_classes is not None  # check_labels made sure
        return guidance.denoiser(self.diffusion, self, labels, self.num_classes)

    def check_labels(self, labels: Tensor) -> Tensor:
        """Class labels for sampling: integers in [0, num_classes) on a conditional model."""
        labels = torch.as_tensor(labels)
        if self.num_classes is None:
            raise ValueError(
                "class_labels were given, but this model is unconditional (trained without "
                "model.net.num_classes). Drop class_labels / per_class."
            )
        if labels.dtype.is_floating_point or labels.ndim != 1:
            raise ValueError("class_labels must be a list of integer class indices.")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"class_labels {labels.tolist()} are out of range: this model knows classes 0 "
                f"to {self.num_classes - 1}."
            )
        return labels.long()


def fused_kwargs(
    factory: OptimizerFactory | None,
    device: torch.device,
    precision: str | None = None,
    clipping: bool = False,
) -> dict[str, bool]:
    """``fused=True`` (one kernel for all parameters, not a Python loop over them) on CUDA and the
    CPU, unless the optimizer config sets ``fused`` itself.

    On the CPU, AdamW's step for unet_cpu's 262 tensors takes 3 ms fused against 17-21 ms in the
    default loop (one thread, measured). Not under Lightning's mixed precision with gradient
    clipping (Lightning refuses to clip for an optimizer that unscales inside its own step), nor
    under 16-mixed at all (its GradScaler must unscale before the logged gradient norm).
    """
    if factory is None or precision == "16-mixed" or lightning_refuses_fused(precision, clipping):
        return {}
    if "fused" in getattr(factory, "keywords", {}) or device.type not in ("cuda", "cpu"):
        return {}
    return {"fused": True} if "fused" in inspect.signature(factory).parameters else {}


def lightning_refuses_fused(precision: str | int | None, clipping: bool) -> bool:
    """Lightning clips no optimizer that unscales inside its own step (``fused=True``) under
    mixed precision, bf16 included: it says so at the first training step."""
    return clipping and str(precision).endswith("-mixed")


def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """(images, data-set indices, labels or None) of a FlowersDataModule batch."""
    images, indices, *rest = batch
    return images, indices, rest[0] if rest else None
