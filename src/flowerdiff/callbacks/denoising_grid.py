"""DenoisingGridCallback: sample grids and denoising trajectories from fixed noise, for review.

The same seed is used at every evaluation and in every run, so image k of epoch 10 and image k
of epoch 50 (or of another run) start from the same x_T and can be compared one to one.

EMA: sampling runs while the EMA weights are swapped in, whatever the callback order (see
:class:`~flowerdiff.callbacks.sampling.ValidationSamplingCallback`). At the end of training EMA
copies the averaged weights in at its ``on_train_end``, so the final grid is drawn there when EMA
comes first.

DDP: only global rank zero samples and logs. Sampling is pure (seeded per image, no collective),
so the other ranks simply go on to their validation steps and wait for rank zero at the next
collective; nothing is called under the rank-zero guard that other ranks would have to join.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from flowerdiff.callbacks.sampling import ValidationSamplingCallback
from flowerdiff.diffusion import make_generators, randn_per_image
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.viz.dashboard import log_image
from flowerdiff.viz.figures import grid, labelled_rows, trajectory_figure

log = logging.getLogger(__name__)


class DenoisingGridCallback(ValidationSamplingCallback):
    """Log ``samples/grid``, ``samples/trajectory`` every few epochs and, once,
    ``samples/forward_diffusion`` (real validation images noised to several levels). For a
    class-conditional model the grid is ``samples/per_class``: one row per class.

    Args:
        every_n_epochs: sample at the validations of epochs ``n-1, 2n-1, ...``; also once at the
            end of training if the last evaluation is older than the last step.
        num_images: images in the sample grid (conditional: per class).
        seed: base seed of the fixed noise (image k always starts from the same noise).
        trajectory_images: how many of the samples get a trajectory row (0 disables it).
        trajectory_columns: steps shown, evenly spaced from noise to data (5: t = 800, ..., 0
            on the book's DDIM-50); each column shows the nearest step the sampler visits.
        show_pred_x0: under each trajectory row, the model's x0 estimate at that step.
        sampler: a sampler config for the figures (None: the run's ``sampler``).
        num_inference_steps: override the sampler's number of steps (e.g. fewer for speed).
        forward_images: real validation images in the forward-diffusion grid (0 disables it).
        forward_columns: noise levels of the forward grid, from clean data to pure noise.
        classes: the classes of the per-class grid (conditional models; None: up to 8 classes
            evenly spread over all of them).
        guidance_scale: classifier-free guidance of the per-class grid.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_images: int = 16,
        seed: int = 0,
        trajectory_images: int = 4,
        trajectory_columns: int = 5,
        show_pred_x0: bool = True,
        sampler: Mapping[str, Any] | None = None,
        num_inference_steps: int | None = None,
        forward_images: int = 6,
        forward_columns: int = 6,
        classes: Sequence[int] | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        super().__init__(sampler, num_inference_steps)
        if every_n_epochs < 1 or num_images < 1 or forward_columns < 2 or trajectory_columns < 1:
            raise ValueError(
                f"callbacks.denoising_grid: every_n_epochs={every_n_epochs}, "
                f"num_images={num_images} and trajectory_columns={trajectory_columns} must be "
                f">= 1 and forward_columns={forward_columns} >= 2 (remove the callback with "
                "`~callbacks.denoising_grid` to switch it off)."
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self.trajectory_images = min(trajectory_images, num_images)
        self.trajectory_columns = trajectory_columns
        self.show_pred_x0 = show_pred_x0
        self.forward_images = forward_images
        self.forward_columns = forward_columns
        self.classes = list(classes) if classes is not None else None
        self.guidance = Guidance(guidance_scale)
        self.last_step = -1
        self.forward_logged = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        num_classes = getattr(pl_module, "num_classes", None)
        if self.classes is not None and num_classes is not None:
            bad = [c for c in self.classes if not 0 <= c < num_classes]
            if bad or not self.classes:
                raise ValueError(
                    f"callbacks.denoising_grid.classes={self.classes} must be class indices in "
                    f"[0, {num_classes}) (model.net.num_classes={num_classes}), at least one; or "
                    "null for up to 8 classes spread over all of them."
                )

    # -- when ---------------------------------------------------------------------------------
    def should_run(self, trainer: L.Trainer) -> bool:
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and trainer.global_step != self.last_step
        )

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights_final = self.ema_first or not self.has_ema  # EMA copied in before this hook
        if trainer.is_global_zero and weights_final and trainer.global_step != self.last_step:
            self.log_samples(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        self.maybe_log_forward(trainer, pl_module, batch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        self.maybe_log_forward(trainer, pl_module, batch)  # runs without validation data

    # -- what ---------------------------------------------------------------------------------
    def grid_classes(self, num_classes: int) -> list[int]:
        if self.classes is not None:
            return list(self.classes)
        count = min(num_classes, 8)
        return [round(k * (num_classes - 1) / max(count - 1, 1)) for k in range(count)]

    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample from the fixed noise and log the grid and the trajectory (rank zero only)."""
        was_training = pl_module.training  # on_train_end comes in train mode
        pl_module.eval()
        sampler = self.sampler_for(pl_module)
        labels = None
        if pl_module.num_classes is not None:
            classes = self.grid_classes(pl_module.num_classes)
            labels = torch.tensor(classes).repeat_interleave(self.num_images)
        with trainer.precision_plugin.forward_context():
            out = pl_module.sample(
                len(labels) if labels is not None else self.num_images,
                seed=self.seed,
                sampler=sampler,
                class_labels=labels,
                guidance=self.guidance if labels is not None else None,
                return_intermediates=self.trajectory_images > 0,
            )
        pl_module.train(was_training)
        self.last_step = trainer.global_step
        if labels is None:
            log_image(trainer, "samples/grid", grid(out.images))
        else:
            # One row per class, its name written beside it (as scripts/sample.py per_class=).
            names = getattr(getattr(pl_module, "spec", None), "class_names", None)
            rows = [names[c] if names else f"class {c}" for c in classes]
            figure = labelled_rows(
                grid(out.images, nrow=self.num_images), rows, out.images.shape[-1]
            )
            log_image(
                trainer,
                "samples/per_class",
                figure,
                caption="rows: " + ", ".join(rows) + f" (guidance {self.guidance.scale:g})",
            )
        if self.trajectory_images > 0:
            figure = trajectory_figure(
                pl_module.diffusion,
                out,
                self.trajectory_images,
                self.trajectory_columns,
                self.show_pred_x0,
            )
            log_image(trainer, "samples/trajectory", figure.image, caption=figure.caption)

    def maybe_log_forward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any
    ) -> None:
        """Once per fit: real images (already on the device, in [-1, 1]) noised to evenly
        spaced levels, from clean data to pure noise, with the same fixed noise per row."""
        if self.forward_logged or self.forward_images < 1 or not trainer.is_global_zero:
            return
        self.forward_logged = True
        images: Tensor = (batch[0] if isinstance(batch, list | tuple) else batch)[
            : self.forward_images
        ]
        diffusion = pl_module.diffusion
        steps = self.forward_columns - 1
        levels = [diffusion.level_at_progress(1 - k / steps) for k in range(self.forward_columns)]
        generators = make_generators(self.seed, 0, images.shape[0])
        noise = randn_per_image(images.shape, generators, images.device, images.dtype)
        columns = []
        for level in levels:
            x = diffusion.add_noise(images, noise, level)
            columns.append(x / (level.alpha**2 + level.sigma**2) ** 0.5)  # unit scale to show
        figure = grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=len(levels))
        caption = ", ".join(diffusion.describe(level) for level in levels)
        log_image(trainer, "samples/forward_diffusion", figure, caption=caption)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.last_step = int(state_dict["last_step"])
