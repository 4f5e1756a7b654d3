"""Exact denoisers for Gaussian data and mixtures of Gaussians: "perfectly trained models".

For data ``x0 ~ N(mean, diag(std^2))`` and ``x = alpha x0 + sigma eps`` the Bayes-optimal
denoiser is ``E[x0 | x] = mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x - alpha mean)`` and
the probability-flow ODE maps each pixel affinely between the marginals, so its end point is
known too. Plugged into a sampler, the oracle isolates the sampler's discretisation error; a
mixture with one Gaussian per class gives exact conditional and unconditional denoisers for
classifier-free guidance. Tests and notebooks share these oracles.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowerdiff.diffusion.base import Denoiser, Diffusion, NoiseLevel, per_sample


class GaussianOracle(nn.Module):
    """Per-pixel Gaussian data N(mean, std^2) (``[C, H, W]``) and its exact denoiser.

    As an ``nn.Module`` it is a network (``forward(x, t, class_labels)``) for the family it was
    made for, so it takes a trained network's place in a :class:`DiffusionModule`.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor, diffusion: Diffusion | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().double())
        self.register_buffer("std", std.detach().double())
        self._network = diffusion.network_for(self.clean_estimate) if diffusion else None

    @classmethod
    def fit(cls, images: Tensor, diffusion: Diffusion | None = None) -> GaussianOracle:
        """The Gaussian with the per-pixel mean and std of ``images`` ``[N, C, H, W]``."""
        if images.ndim != 4 or len(images) < 2:
            raise ValueError(
                f"GaussianOracle.fit needs a batch [N, C, H, W] with N >= 2 images to estimate "
                f"a per-pixel mean and std; got shape {tuple(images.shape)}."
            )
        images = images.double()
        return cls(images.mean(0), images.std(0), diffusion)

    def clean_estimate(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """E[x0 | x] for ``x = alpha x0 + sigma eps`` (float64)."""
        mean, var = self.mean.to(x.device), self.std.to(x.device) ** 2
        return mean + alpha * var / (alpha**2 * var + sigma**2) * (x.double() - alpha * mean)

    def denoiser(self) -> Denoiser:
        """The exact denoiser as samplers call it (no network, no parametrisation)."""

        def denoise(x: Tensor, level: NoiseLevel) -> Tensor:
            return self.clean_estimate(x, level.alpha, level.sigma).float()

        return denoise

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self._network is None:
            raise ValueError("This oracle was made without a diffusion: use denoiser() instead.")
        return self._network(x, t, class_labels)

    def ode_solution(self, x_start: Tensor, level: NoiseLevel) -> Tensor:
        """Exact clean end point of the probability-flow ODE started at ``x_start`` at
        ``level``: the standardised value ``(x - alpha mean) / sqrt(Var[x])`` is conserved."""
        mean, std = self.mean.to(x_start.device), self.std.to(x_start.device)
        spread = (level.alpha**2 * std**2 + level.sigma**2).sqrt()
        return (mean + std * (x_start.double() - level.alpha * mean) / spread).to(x_start.dtype)


class GaussianMixtureOracle(nn.Module):
    """Data drawn from one per-pixel Gaussian per class, with equal class weights.

    The conditional denoiser is each class's Gaussian one; the unconditional one weighs them
    by their posterior responsibility given x. Labels equal to ``num_classes`` (the null class)
    get the unconditional denoiser, as a network trained with label dropout would.
    """

    means: Tensor
    stds: Tensor

    def __init__(self, means: Tensor, stds: Tensor, diffusion: Diffusion | None = None) -> None:
        super().__init__()
        self.register_buffer("means", means.detach().double())  # [K, C, H, W]
        self.register_buffer("stds", stds.detach().double())
        self.num_classes = len(means)
        self.diffusion = diffusion

    def class_estimates(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """[K, B, C, H, W]: E[x0 | x, class k] for every class."""
        x = x.double()
        var = self.stds.to(x.device)[:, None] ** 2
        mean = self.means.to(x.device)[:, None]
        return mean + alpha * var / (alpha**2 * var + sigma**2) * (x[None] - alpha * mean)

    def log_likelihoods(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """[K, B]: log p(x | class k) (Gaussian marginals of the noised data)."""
        x = x.double()
        var = alpha**2 * self.stds.to(x.device)[:, None] ** 2 + sigma**2
        diff = x[None] - alpha * self.means.to(x.device)[:, None]
        return (-0.5 * (diff**2 / var + var.log())).flatten(2).sum(-1)

    def clean_estimate(
        self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, labels: Tensor | None
    ) -> Tensor:
        estimates = self.class_estimates(x, alpha, sigma)
        weights = self.log_likelihoods(x, alpha, sigma).softmax(dim=0)  # p(k | x), [K, B]
        unconditional = (weights[..., None, None, None] * estimates).sum(0)
        if labels is None:
            return unconditional
        labels = labels.to(x.device)
        known = labels < self.num_classes
        index = labels.clamp(max=self.num_classes - 1)
        conditional = estimates[index, torch.arange(len(labels), device=x.device)]
        return torch.where(per_sample(known, conditional), conditional, unconditional)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self.diffusion is None:
            raise ValueError("This oracle was made without a diffusion.")
        network = self.diffusion.network_for(
            lambda x_, alpha, sigma: self.clean_estimate(x_, alpha, sigma, class_labels)
        )
        return network(x, t, class_labels)


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
