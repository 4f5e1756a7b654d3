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
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from flowerdiff.callbacks.sampling import ValidationSamplingCallback
from flowerdiff.diffusion import Sampler, make_generators, randn_per_image
from flowerdiff.images import grid, nearest_steps, trajectory_grid, trajectory_targets
from flowerdiff.loggers import log_image

log = logging.getLogger(__name__)


class DenoisingGridCallback(ValidationSamplingCallback):
    """Log ``samples/grid``, ``samples/trajectory`` every few epochs and, once,
    ``samples/forward_diffusion`` (real validation images noised to several timesteps).

    Args:
        every_n_epochs: sample at the validations of epochs ``n-1, 2n-1, ...``; also once at the
            end of training if the last evaluation is older than the last step.
        num_images: images in the sample grid.
        seed: base seed of the fixed noise (image k always starts from the same x_T).
        trajectory_images: how many of the samples get a trajectory row (0 disables it).
        trajectory_columns: timesteps shown, evenly spaced from T to 0 (5: t = 800, ..., 0);
            each column shows the nearest step the sampler visits.
        show_pred_x0: under each trajectory row, the model's x0 estimate at that step.
        sampler: sampler for the figures (None: the module's own, i.e. the ``sampler`` config).
        num_inference_steps: override the sampler's number of steps (e.g. fewer for speed).
        forward_images: real validation images in the forward-diffusion grid (0 disables it).
        forward_timesteps: the forward grid's columns (the book's t = 0, 200, ..., 999).
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_images: int = 16,
        seed: int = 0,
        trajectory_images: int = 4,
        trajectory_columns: int = 5,
        show_pred_x0: bool = True,
        sampler: Sampler | None = None,
        num_inference_steps: int | None = None,
        forward_images: int = 6,
        forward_timesteps: Sequence[int] = (0, 200, 400, 600, 800, 999),
    ) -> None:
        super().__init__(sampler, num_inference_steps)
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(
                f"callbacks.denoising_grid: every_n_epochs={every_n_epochs} and "
                f"num_images={num_images} must both be >= 1 (remove the callback with "
                "`~callbacks.denoising_grid` to switch it off)."
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self.trajectory_images = min(trajectory_images, num_images)
        self.trajectory_columns = trajectory_columns
        self.show_pred_x0 = show_pred_x0
        self.forward_images = forward_images
        self.forward_timesteps = list(forward_timesteps)
        self.last_step = -1
        self.forward_logged = False

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
    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample from the fixed noise and log the grid and the trajectory (rank zero only)."""
        was_training = pl_module.training  # on_train_end comes in train mode
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            out = pl_module.sample(
                self.num_images,
                seed=self.seed,
                sampler=self.sampler_for(pl_module),
                return_intermediates=self.trajectory_images > 0,
            )
        pl_module.train(was_training)
        self.last_step = trainer.global_step
        log_image(trainer, "samples/grid", grid(out.images))
        if self.trajectory_images > 0:
            targets = trajectory_targets(pl_module.schedule.num_timesteps, self.trajectory_columns)
            steps = nearest_steps(out.timesteps, targets)
            n = self.trajectory_images
            figure = trajectory_grid(
                [x[:n] for x in out.intermediates],
                [x[:n] for x in out.pred_x0] if self.show_pred_x0 else None,
                steps,
            )
            shown = ", ".join(str(out.timesteps[i]) for i in steps)
            rows = "x_t / predicted x0 rows" if self.show_pred_x0 else "x_t rows"
            log_image(trainer, "samples/trajectory", figure, caption=f"t = {shown} ({rows})")

    def maybe_log_forward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any
    ) -> None:
        """Once per fit: real images (already on the device, in [-1, 1]) noised to each of
        ``forward_timesteps`` with the same fixed noise per row."""
        if self.forward_logged or self.forward_images < 1 or not trainer.is_global_zero:
            return
        self.forward_logged = True
        images: Tensor = (batch[0] if isinstance(batch, list | tuple) else batch)[
            : self.forward_images
        ]
        schedule = pl_module.schedule
        timesteps = [min(int(t), schedule.num_timesteps - 1) for t in self.forward_timesteps]
        generators = make_generators(self.seed, 0, images.shape[0])
        noise = randn_per_image(images.shape, generators, images.device, images.dtype)
        columns = []
        for t in timesteps:
            t_batch = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)
            columns.append(schedule.add_noise(images, noise, t_batch))
        figure = grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=len(timesteps))
        caption = "t = " + ", ".join(map(str, timesteps))
        log_image(trainer, "samples/forward_diffusion", figure, caption=caption)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.last_step = int(state_dict["last_step"])
