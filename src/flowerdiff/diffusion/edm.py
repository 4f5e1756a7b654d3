"""EDM (Karras et al. 2022): continuous sigma, preconditioning, log-normal training levels.

Following NVlabs/edm (``training/networks.py`` EDMPrecond, ``training/loss.py`` EDMLoss,
``generate.py`` edm_sampler), with x = x0 + sigma * eps and ``sigma_data`` the data's std:

    c_skip = sd^2 / (s^2 + sd^2)      c_out = s sd / sqrt(s^2 + sd^2)
    c_in   = 1 / sqrt(s^2 + sd^2)     c_noise = ln(s) / 4
    D(x; s) = c_skip x + c_out F(c_in x; c_noise)

Training draws ln(s) ~ N(P_mean, P_std^2) and weights the squared error of D by
(s^2 + sd^2) / (s sd)^2, which makes the effective target of F unit-variance at every level.
With ``learned_weighting`` (EDM2, Karras et al. 2024, section 5.1 / ``training/loss.py``), a
small head u(c_noise) learns the log variance of that weighted loss per level, and training
minimises ``weighted error / exp(u) + u``: every level contributes a loss of about 1, so no
level's gradients drown the others. Validation keeps the fixed weighting (comparable runs).
Sampling visits the Karras grid s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
then 0. The network receives c_noise through its ordinary time embedding.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn

from flowerdiff.diffusion.base import (
    CLEAN,
    CleanEstimate,
    Diffusion,
    Network,
    NoiseLevel,
    SamplingPlan,
    per_sample,
)

VALIDATION_LEVELS = 10
LOGVAR_FEATURES = 128  # EDM2's logvar_channels


class LogVarHead(nn.Module):
    """EDM2's per-level log variance u(c_noise): fixed random Fourier features of c_noise and a
    linear layer initialised at zero (so training starts with EDM's own weighting)."""

    def __init__(self, features: int = LOGVAR_FEATURES) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # fixed features: rebuilt, not stored
        frequencies = 2 * math.pi * torch.randn(features, generator=generator)
        phases = 2 * math.pi * torch.rand(features, generator=generator)
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.register_buffer("phases", phases, persistent=False)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_noise: Tensor) -> Tensor:
        with torch.autocast(c_noise.device.type, enabled=False):  # a float32 head under bf16
            angle = c_noise.float()[:, None] * self.frequencies + self.phases
            return self.linear(torch.cos(angle) * math.sqrt(2)).squeeze(1)


class EDMDiffusion(Diffusion):
    """Variance-exploding diffusion with EDM's preconditioning and loss.

    Args:
        sampler: the default sampler (``heun`` in ``conf/diffusion/edm.yaml``'s pairing).
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
        p_mean, p_std: training levels ln(sigma) ~ N(p_mean, p_std^2).
        sigma_min, sigma_max, rho: the sampling grid.
        learned_weighting: EDM2's learned per-level loss weighting (a 129-parameter head the
            optimizer trains with the network; not used for sampling).
    """

    name = "edm"

    def __init__(
        self,
        sampler: Any,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        learned_weighting: bool = False,
    ) -> None:
        super().__init__(sampler)
        if not isinstance(learned_weighting, bool):
            raise ValueError(
                f"`diffusion.learned_weighting={learned_weighting!r}` must be true or false."
            )
        for key, value in (("sigma_data", sigma_data), ("p_std", p_std), ("rho", rho)):
            if not _is_number(value) or not value > 0:
                raise ValueError(f"`diffusion.{key}={value!r}` must be a number > 0.")
        if not _is_number(p_mean):
            raise ValueError(f"`diffusion.p_mean={p_mean!r}` must be a number (EDM: -1.2).")
        if not (_is_number(sigma_min) and _is_number(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(
                f"`diffusion.sigma_min={sigma_min!r}` / `diffusion.sigma_max={sigma_max!r}` must "
                "satisfy 0 < sigma_min < sigma_max (EDM: 0.002 and 80)."
            )
        self.sigma_data = float(sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)
        self.logvar = LogVarHead() if learned_weighting else None
        # Validation levels: the deciles of the training distribution of sigma.
        quantiles = [(k + 0.5) / VALIDATION_LEVELS for k in range(VALIDATION_LEVELS)]
        sigmas = [math.exp(p_mean + p_std * NormalDist().inv_cdf(q)) for q in quantiles]
        self.register_buffer("_validation_sigmas", torch.tensor(sigmas), persistent=False)

    def family_config(self) -> dict[str, Any]:
        return {
            "sigma_data": self.sigma_data,
            "p_mean": self.p_mean,
            "p_std": self.p_std,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "rho": self.rho,
            "learned_weighting": self.logvar is not None,
        }

    @staticmethod
    def level(sigma: float) -> NoiseLevel:
        return NoiseLevel(t=float(sigma), alpha=1.0, sigma=float(sigma))

    # -- preconditioning ------------------------------------------------------------------
    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for a tensor of sigmas."""
        sd = self.sigma_data
        total = sigma**2 + sd**2
        return sd**2 / total, sigma * sd / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4

    def _denoise(self, net: Network, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        """D(x; sigma) for per-sample ``sigma`` [B]."""
        c_skip, c_out, c_in, c_noise = self.precondition(sigma.float())
        output = net(per_sample(c_in, x) * x, c_noise, cond).float()
        if output.shape != x.shape:
            raise ValueError(
                f"The network's output shape {tuple(output.shape)} does not match its input "
                f"{tuple(x.shape)}; it must predict one value per pixel."
            )
        return per_sample(c_skip, x) * x.float() + per_sample(c_out, x) * output

    def denoise(
        self, net: Network, x: Tensor, level: NoiseLevel, cond: Tensor | None = None
    ) -> Tensor:
        sigma = torch.full((x.shape[0],), level.ve_sigma, dtype=torch.float32, device=x.device)
        return self._denoise(net, x, sigma, cond)

    def network_for(self, clean_estimate: CleanEstimate) -> Network:
        def network(x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
            sigma = (4 * torch.as_tensor(c_noise).double().reshape(-1)).exp()
            sigma = sigma.expand(x_in.shape[0]).to(x_in.device)
            c_skip, c_out, c_in, _ = (per_sample(c, x_in) for c in self.precondition(sigma))
            x = x_in.double() / c_in
            x0 = clean_estimate(x, torch.ones_like(c_in), per_sample(sigma, x_in))
            return ((x0 - c_skip * x) / c_out).float()

        return network

    # -- training -------------------------------------------------------------------------
    def loss(
        self,
        net: Network,
        x0: Tensor,
        cond: Tensor | None = None,
        noise: Tensor | None = None,
        levels: Tensor | None = None,
    ) -> Tensor:
        sigma = levels
        if sigma is None:
            normal = torch.randn(x0.shape[0], device=x0.device)
            sigma = (normal * self.p_std + self.p_mean).exp()
        if noise is None:
            noise = torch.randn_like(x0)
        sigma = sigma.float()
        denoised = self._denoise(net, x0 + per_sample(sigma, x0) * noise, sigma, cond)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        weighted = weight * ((denoised - x0.float()) ** 2).flatten(1).mean(dim=1)
        if self.logvar is None or not self.training:
            return weighted.mean()
        logvar = self.logvar(sigma.log() / 4)
        return (weighted / logvar.exp() + logvar).mean()

    def validation_levels(self, indices: Tensor) -> Tensor:
        sigmas = self._validation_sigmas.to(indices.device)
        return sigmas[indices % len(sigmas)]

    def add_noise(self, x0: Tensor, noise: Tensor, level: NoiseLevel) -> Tensor:
        return x0 + level.sigma * noise

    # -- sampling -------------------------------------------------------------------------
    def initial_state(self, noise: Tensor, level: NoiseLevel) -> Tensor:
        """sigma_max * noise, as EDM's sampler starts."""
        return noise.float() * level.sigma

    def _ramp(self, position: float) -> float:
        """The Karras grid at ``position`` in [0, 1]: sigma_max at 0, sigma_min at 1."""
        inv_rho = 1.0 / self.rho
        high, low = self.sigma_max**inv_rho, self.sigma_min**inv_rho
        return (high + position * (low - high)) ** self.rho

    def plan(self, sampler: Any) -> SamplingPlan:
        if sampler.timestep_spacing not in (None, "karras"):
            raise ValueError(
                f"`sampler.timestep_spacing={sampler.timestep_spacing!r}` is a DDPM-family "
                "spacing; EDM samples on the Karras grid (diffusion.sigma_min, sigma_max, rho). "
                "Set sampler.timestep_spacing=null."
            )
        n = sampler.num_inference_steps
        positions = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
        return SamplingPlan(
            levels=[self.level(self._ramp(p)) for p in positions],
            lowest=self.level(self.sigma_min),
            level_at_ve_sigma=lambda sigma: self.level(sigma) if sigma > 0 else CLEAN,
        )

    def level_at_progress(self, progress: float) -> NoiseLevel:
        return self.level(self._ramp(progress))

    def progress(self, level: NoiseLevel) -> float:
        if level.sigma == 0:
            return 1.0
        inv_rho = 1.0 / self.rho
        high, low = self.sigma_max**inv_rho, self.sigma_min**inv_rho
        return (high - level.sigma**inv_rho) / (high - low)

    def describe(self, level: NoiseLevel) -> str:
        return "clean" if level.sigma == 0 else f"σ={level.sigma:.3g}"

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.family_config().items())


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
