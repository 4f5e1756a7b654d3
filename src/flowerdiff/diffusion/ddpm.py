"""The discrete DDPM family: a noise schedule over T timesteps and an epsilon / v / x0 network.

This is the book's process (cosine-clipped betas, epsilon prediction, L1 loss) and its usual
variants. The prediction type is known here and nowhere else: :meth:`DDPMDiffusion.denoise`
turns the network's output into an x0 estimate for the samplers, and :meth:`loss` regresses
the network onto :meth:`training_target`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowerdiff.diffusion.base import (
    CLEAN,
    CleanEstimate,
    Diffusion,
    Network,
    NoiseLevel,
    SamplingPlan,
    per_sample,
)
from flowerdiff.diffusion.losses import RegressionLoss, min_snr_weight
from flowerdiff.diffusion.schedules import NoiseSchedule
from flowerdiff.registry import check_keys

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v", "x0")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
VALIDATION_LEVELS = 10  # the validation loss is measured at this many fixed timesteps


def spaced_timesteps(num_steps: int, num_train_timesteps: int, spacing: str) -> list[int]:
    """Descending timesteps exactly as diffusers' ``set_timesteps`` (steps_offset=0): for 50 of
    1000 steps, leading 980..0, trailing 999..19, linspace 999..0."""
    n, T = num_steps, num_train_timesteps
    if spacing == "leading":
        steps = (np.arange(0, n) * (T // n)).round()[::-1]
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        steps = np.linspace(0, T - 1, n).round()[::-1]
    return [int(s) for s in steps]


class DDPMDiffusion(Diffusion):
    """Discrete variance-preserving diffusion (Ho et al. 2020) with a choice of parametrisation.

    Args:
        sampler: the default sampler (samples, grids, FID).
        schedule: the noise schedule config (``name`` + its parameters, see :data:`SCHEDULES`).
        prediction: what the network predicts: ``epsilon`` (the book), ``v`` (Salimans & Ho
            2022, ``v = sqrt(abar) eps - sqrt(1 - abar) x0``) or ``x0``.
        loss: the regression loss config (:class:`RegressionLoss`).
    """

    name = "ddpm"

    def __init__(
        self,
        sampler: Any,
        schedule: dict[str, Any] | None = None,
        prediction: str = "epsilon",
        loss: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(sampler)
        if prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"`diffusion.prediction={prediction!r}` is not a known prediction type. Valid "
                f"values are {', '.join(map(repr, PREDICTION_TYPES))}: what the network predicts "
                "(the noise, as the book; the velocity v; or the clean image)."
            )
        for key, value in (("schedule", schedule), ("loss", loss)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(
                    f"`diffusion.{key}` must be a mapping of its options; got "
                    f"{type(value).__name__} {value!r}."
                )
        self.schedule = NoiseSchedule(**(schedule or {}))
        self.prediction = prediction
        check_keys(RegressionLoss, loss or {}, "diffusion.loss", named=False)
        self.regression = RegressionLoss(**(loss or {}))
        if self.schedule.zero_terminal_snr and prediction == "epsilon":
            raise ValueError(
                "`diffusion.schedule.zero_terminal_snr=true` with `diffusion.prediction=epsilon`: "
                "at the last timestep there is no signal left, so x0 cannot be recovered from a "
                "noise prediction. Use diffusion.prediction=v (recommended with zero terminal "
                "SNR) or x0, or switch zero_terminal_snr off."
            )
        T = self.schedule.num_timesteps
        # Python floats of the float32 tables: the steps compute with exactly these values.
        self._alpha = self.schedule.sqrt_alphas_cumprod.double().tolist()
        self._sigma = self.schedule.sqrt_one_minus_alphas_cumprod.double().tolist()
        self._abar = self.schedule.alphas_cumprod.double().tolist()
        # log of the VE noise level sigma/alpha per timestep, for levels between timesteps.
        abar = self.schedule.alphas_cumprod.double()
        self._log_ve_sigma = (0.5 * ((1 - abar).log() - abar.log())).tolist()
        # The same three tables as float64 CPU tensors for :meth:`coefficients`, built once
        # (not buffers: nothing of them belongs in a state dict or on the GPU).
        self._coefficient_tables = tuple(
            torch.tensor(values, dtype=torch.float64)
            for values in (self._alpha, self._sigma, self._log_ve_sigma)
        )
        grid = torch.linspace(0, T - 1, VALIDATION_LEVELS).round().long()
        self.register_buffer("_validation_timesteps", grid, persistent=False)

    def family_config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_config(),
            "prediction": self.prediction,
            "loss": self.regression.to_config(),
        }

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def level(self, t: int) -> NoiseLevel:
        """The level of training timestep ``t``."""
        abar = self._abar[t]
        return NoiseLevel(float(t), self._alpha[t], self._sigma[t], abar, 1.0 - abar)

    # -- parametrisation ------------------------------------------------------------------
    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output for ``x_t = add_noise(x0, noise, t)``."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "x0":
            return x0
        gather = self.schedule.gather
        return (
            gather(self.schedule.sqrt_alphas_cumprod, t, x0) * noise
            - gather(self.schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def x0_from_output(self, output: Tensor, x: Tensor, level: NoiseLevel) -> Tensor:
        """x0 implied by the network output at ``level``."""
        if self.prediction == "x0":
            return output
        if self.prediction == "v":
            return level.alpha * x - level.sigma * output
        return (x - level.sigma * output) / level.alpha

    def network_input_t(self, level: NoiseLevel, batch: int, device: torch.device) -> Tensor:
        """The timestep tensor the network sees: integer timesteps as long, others as float."""
        if level.t == int(level.t):
            return torch.full((batch,), int(level.t), dtype=torch.long, device=device)
        return torch.full((batch,), level.t, dtype=torch.float32, device=device)

    def denoise(
        self, net: Network, x: Tensor, level: NoiseLevel, cond: Tensor | None = None
    ) -> Tensor:
        t = self.network_input_t(level, x.shape[0], x.device)
        output = net(x, t, cond).float()
        if output.shape != x.shape:
            raise ValueError(
                f"The network's output shape {tuple(output.shape)} does not match its input "
                f"{tuple(x.shape)}; it must predict one value per pixel."
            )
        return self.x0_from_output(output, x, level)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha and sigma (float64, [B]) of timesteps ``t``; fractional ones interpolate the
        VE noise level as :meth:`level_at_ve_sigma` does."""
        t = t.detach().double().cpu()
        table_alpha, table_sigma, table = self._coefficient_tables
        low = t.floor().long().clamp(0, len(table) - 1)
        high = (low + 1).clamp(max=len(table) - 1)
        log_sigma = table[low] + (t - low) * (table[high] - table[low])
        alpha = 1 / (1 + (2 * log_sigma).exp()).sqrt()
        exact = t == t.round()  # table values exactly, as the samplers use them
        return (
            torch.where(exact, table_alpha[low], alpha),
            torch.where(exact, table_sigma[low], alpha * log_sigma.exp()),
        )

    def network_for(self, clean_estimate: CleanEstimate) -> Network:
        def network(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
            t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
            alpha, sigma = (per_sample(c.to(x.device), x) for c in self.coefficients(t))
            x = x.double()
            x0 = clean_estimate(x, alpha, sigma)
            if self.prediction == "x0":
                return x0.float()
            eps = (x - alpha * x0) / sigma
            return (eps if self.prediction == "epsilon" else alpha * eps - sigma * x0).float()

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
        t = levels
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        output = net(x_t, t, cond)
        per_sample = self.regression.per_sample(output, self.training_target(x0, noise, t))
        if self.regression.weighting == "min_snr":
            snr = self.schedule.snr(t).to(per_sample.device)
            per_sample = per_sample * min_snr_weight(
                snr, self.regression.snr_gamma, self.prediction
            )
        return per_sample.mean()

    def validation_levels(self, indices: Tensor) -> Tensor:
        grid = self._validation_timesteps.to(indices.device)
        return grid[indices % len(grid)]

    def add_noise(self, x0: Tensor, noise: Tensor, level: NoiseLevel) -> Tensor:
        return level.alpha * x0 + level.sigma * noise

    # -- sampling -------------------------------------------------------------------------
    def initial_state(self, noise: Tensor, level: NoiseLevel) -> Tensor:
        """The VP prior N(0, 1), as the book and diffusers start (the data's share at the
        noisiest timestep, sqrt(abar_T), is negligible)."""
        return noise.float()

    def plan(self, sampler: Any) -> SamplingPlan:
        spacing = sampler.timestep_spacing or sampler.default_timestep_spacing
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"`sampler.timestep_spacing={spacing!r}` is not a spacing of the DDPM family. "
                f"Valid values are {', '.join(map(repr, TIMESTEP_SPACINGS))} (diffusers' "
                "semantics; the book uses 'leading'), or null for the sampler's default."
            )
        steps = sampler.num_inference_steps
        if steps > self.num_timesteps:
            raise ValueError(
                f"`sampler.num_inference_steps={steps}` exceeds "
                f"`diffusion.schedule.num_timesteps={self.num_timesteps}`: a sampler visits each "
                f"training timestep at most once. Valid values are 1 to {self.num_timesteps}."
            )
        timesteps = spaced_timesteps(steps, self.num_timesteps, spacing)
        return SamplingPlan(
            levels=[self.level(t) for t in timesteps],
            lowest=self.level(0),
            level_at_ve_sigma=self.level_at_ve_sigma,
        )

    def level_at_ve_sigma(self, ve_sigma: float) -> NoiseLevel:
        """The (fractional) timestep whose VE noise level is ``ve_sigma``: log-sigma is
        interpolated linearly between the table's timesteps, as k-diffusion does."""
        if ve_sigma <= 0:
            return CLEAN
        log_sigma = math.log(ve_sigma)
        table = self._log_ve_sigma
        if log_sigma <= table[0]:
            t = 0.0
        elif log_sigma >= table[-1]:
            t = float(len(table) - 1)
        else:
            high = int(np.searchsorted(table, log_sigma))
            low = high - 1
            t = low + (log_sigma - table[low]) / (table[high] - table[low])
        alpha = 1.0 / math.sqrt(1.0 + ve_sigma**2)
        return NoiseLevel(t=t, alpha=alpha, sigma=ve_sigma * alpha)

    def level_at_progress(self, progress: float) -> NoiseLevel:
        T = self.num_timesteps
        return self.level(min(round(T * (1.0 - progress)), T - 1))

    def progress(self, level: NoiseLevel) -> float:
        return 1.0 if level.sigma == 0 else 1.0 - level.t / self.num_timesteps

    def describe(self, level: NoiseLevel) -> str:
        if level.sigma == 0:
            return "clean"
        return f"t={level.t:g}" if level.t == int(level.t) else f"t={level.t:.1f}"

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, loss={self.regression!r}"
