"""The exact denoiser for Gaussian data: a "perfectly trained model" with no training.

For data ``x0 ~ N(mean, diag(std**2))`` the Bayes-optimal denoiser ``E[x0 | x_t]`` and the
probability-flow ODE solution are both known in closed form. Plugging the denoiser into a sampler
therefore isolates the sampler's own discretisation error: any gap to :meth:`ode_solution` is the
sampler's, not a network's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowerdiff.diffusion import DDIMSampler, DiffusionLoss, NoiseSchedule, Sampler
from flowerdiff.diffusion.schedules import check_prediction_type
from flowerdiff.module import DiffusionModule


class GaussianDenoiser(nn.Module):
    """``model(x_t, t)`` returning the exact prediction for per-pixel Gaussian data.

    A parameter-free ``nn.Module``, so it takes a trained network's place anywhere: as a
    sampler's ``model_fn`` or as the ``net`` of a :class:`DiffusionModule`
    (:func:`analytic_module`).

    Args:
        mean, std: per-pixel data mean and standard deviation, shape ``[C, H, W]`` (or anything
            that broadcasts against one image).
        schedule: the forward process whose ``x_t`` the model is asked about.
        prediction_type: what the "network" outputs (``"epsilon"``, ``"v"`` or ``"x0"``), so it
            plugs into any sampler exactly like a trained model of that type.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, mean: Tensor, std: Tensor, schedule: NoiseSchedule, prediction_type: str = "epsilon"
    ) -> None:
        super().__init__()
        check_prediction_type(prediction_type)
        self.register_buffer("mean", mean.detach().double())
        self.register_buffer("std", std.detach().double())
        self.schedule = schedule
        self.prediction_type = prediction_type

    @classmethod
    def fit(
        cls, images: Tensor, schedule: NoiseSchedule, prediction_type: str = "epsilon"
    ) -> GaussianDenoiser:
        """The Gaussian with the per-pixel mean and std of ``images`` ``[N, C, H, W]``."""
        if images.ndim != 4 or len(images) < 2:
            raise ValueError(
                f"GaussianDenoiser.fit needs a batch [N, C, H, W] with N >= 2 images to estimate "
                f"a per-pixel mean and std; got shape {tuple(images.shape)}."
            )
        images = images.float()
        return cls(images.mean(0), images.std(0), schedule, prediction_type)

    def _signal_and_variance(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t) and Var[x_t] = abar_t std^2 + 1 - abar_t, float64, shaped like ``like``."""
        table = self.schedule.alphas_cumprod
        abar = table[torch.as_tensor(t, device=table.device).long()].to(like.device, torch.float64)
        abar = abar.reshape(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt(), abar * self._std(like) ** 2 + (1 - abar)

    def _mean(self, like: Tensor) -> Tensor:
        return self.mean.to(like.device, torch.float64)

    def _std(self, like: Tensor) -> Tensor:
        return self.std.to(like.device, torch.float64)

    def posterior_mean(self, x_t: Tensor, t: Tensor) -> Tensor:
        """E[x0 | x_t] = mean + sqrt(abar) std^2 / Var[x_t] * (x_t - sqrt(abar) mean)."""
        a, variance = self._signal_and_variance(t, x_t)
        mean, std = self._mean(x_t), self._std(x_t)
        x0 = mean + a * std**2 / variance * (x_t.double() - a * mean)
        return x0.to(x_t.dtype)

    def forward(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The optimal output for ``prediction_type``, through the schedule's own conversions."""
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        x0 = self.posterior_mean(x_t, t)
        if self.prediction_type == "x0":
            return x0
        eps = self.schedule.predict_eps(x0, x_t, t, "x0")
        return self.schedule.training_target(x0, eps, t, self.prediction_type)

    def ode_solution(self, x_start: Tensor, t_start: int) -> Tensor:
        """Exact end point (t = 0, abar = 1) of the probability-flow ODE started at ``x_start``.

        The flow moves every pixel along the monotone affine map between the Gaussian marginals,
        so the standardised value ``(x_t - sqrt(abar) mean) / sqrt(Var[x_t])`` is conserved.
        ``t_start`` is the first timestep the sampler visits (the noise it starts from is
        treated as ``x_{t_start}``).
        """
        t = torch.full((x_start.shape[0],), int(t_start), dtype=torch.long)
        a, variance = self._signal_and_variance(t, x_start)
        mean, std = self._mean(x_start), self._std(x_start)
        return (mean + std * (x_start.double() - a * mean) / variance.sqrt()).to(x_start.dtype)


def pixel_frechet_distance(samples: Tensor, mean: Tensor, std: Tensor) -> float:
    """Fréchet distance between the samples' per-pixel Gaussian and ``N(mean, diag(std^2))``.

    FID's formula on raw pixels with diagonal covariances, averaged (not summed) over pixels so
    that it does not grow with the resolution: ``mean((m - mean)^2 + (s - std)^2)`` with ``m``,
    ``s`` the samples' per-pixel mean and std. It sees only first and second moments, so it is a
    sampler-convergence measure, not an image-quality score.
    """
    samples = samples.float()
    sample_mean, sample_std = samples.mean(0), samples.std(0)
    mean, std = mean.to(samples.device).float(), std.to(samples.device).float()
    return float(((sample_mean - mean) ** 2 + (sample_std - std) ** 2).mean())


def analytic_module(
    images: Tensor,
    schedule: NoiseSchedule | None = None,
    prediction_type: str = "epsilon",
    sampler: Sampler | None = None,
) -> DiffusionModule:
    """A :class:`DiffusionModule` whose network is the exact denoiser for the per-pixel Gaussian
    fit of ``images`` ``[N, C, H, W]``: it samples like a trained checkpoint (``sample()``,
    seeds, any sampler) with no training at all."""
    schedule = schedule or NoiseSchedule()
    return DiffusionModule(
        net=GaussianDenoiser.fit(images, schedule, prediction_type),
        schedule=schedule,
        loss=DiffusionLoss(),
        sampler=sampler or DDIMSampler(),
        prediction=prediction_type,
        image_size=images.shape[-1],
        in_channels=images.shape[1],
    ).eval()
