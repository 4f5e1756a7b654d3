"""Samplers: step from noise to data on a family's grid of noise levels, given only a denoiser.

A sampler never sees a network, a schedule or a prediction type. It gets a denoiser
``(x, level) -> x0``, a :class:`~flowerdiff.diffusion.base.SamplingPlan` and the starting state,
and moves between levels with the coefficients of each level (``x = alpha x0 + sigma eps``).
Written that way, DDIM, DDPM and DPM-Solver++ run unchanged on EDM's variance-exploding levels
(alpha = 1) and Heun and Euler on the DDPM family's variance-preserving ones.

Shared conventions:

* The step after the last visited level goes to clean data (alpha = 1, sigma = 0), unless a
  sampler says otherwise (DDIM's ``final_alpha_one=False``).
* The denoiser's x0 is post-processed (clipping, dynamic thresholding) as configured before a
  step uses it; step math is float32 even when the network runs under autocast.
* Fresh noise comes from :func:`~flowerdiff.diffusion.noise.randn_per_image` with one CPU
  generator per image, so a seed gives the same image whatever the batch split or device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowerdiff.diffusion.base import CLEAN, Denoiser, NoiseLevel, SamplerOutput, SamplingPlan
from flowerdiff.diffusion.noise import randn_per_image
from flowerdiff.registry import Registry

SAMPLERS: Registry[Sampler] = Registry("sampler", "sampler")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace", "karras")
# Called after every step with the new state and the level it reached; returns the state to
# go on from (inpainting puts the known pixels back, flowerdiff.diffusion.editing).
Projection = Callable[[Tensor, NoiseLevel], Tensor]


@dataclass
class _Run:
    """What one ``sample`` call's steps share."""

    denoiser: Denoiser
    plan: SamplingPlan
    end: NoiseLevel  # where the step after the last visited level goes
    generators: Sequence[torch.Generator] | None
    history: Tensor | None = None  # multistep solvers' previous x0

    def next_level(self, i: int) -> NoiseLevel:
        levels = self.plan.levels
        return levels[i + 1] if i + 1 < len(levels) else self.end

    def noise_like(self, x: Tensor) -> Tensor:
        return randn_per_image(x.shape, self.generators, x.device)


class Sampler:
    """Base class: options shared by every sampler, x0 post-processing and the loop.

    Args:
        num_inference_steps: levels visited (>= 1; for the DDPM family at most T); None: the
            sampler's own default (:attr:`default_steps`).
        timestep_spacing: how the family spaces them; DDPM family: ``leading`` | ``trailing`` |
            ``linspace`` (diffusers' semantics); EDM: the Karras grid. None: the family's default
            for this sampler (:attr:`default_timestep_spacing` on the DDPM family).
        clip_sample: clamp the x0 estimate to [-1, 1] before a step uses it.
        dynamic_threshold: Imagen's dynamic thresholding percentile ``p`` in (0, 1] (Saharia
            et al. 2022; 0.995 is theirs), or None. Per image, ``s = max(quantile(|x0|, p), 1)``
            and x0 becomes ``clamp(x0, -s, s) / s``. Takes precedence over ``clip_sample``.
    """

    default_timestep_spacing = "leading"
    default_steps = 50

    def __init__(
        self,
        num_inference_steps: int | None = None,
        timestep_spacing: str | None = None,
        clip_sample: bool = True,
        dynamic_threshold: float | None = None,
    ) -> None:
        if num_inference_steps is None:
            num_inference_steps = self.default_steps
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(
                f"`sampler.num_inference_steps={num_inference_steps!r}` (or `steps=`) is invalid: "
                "it is the number of denoising steps, an integer >= 1 (50 in the book)."
            )
        if timestep_spacing is not None and timestep_spacing not in SPACINGS:
            raise ValueError(
                f"`sampler.timestep_spacing={timestep_spacing!r}` is not known. Valid values are "
                f"null (the family's default), {', '.join(map(repr, SPACINGS[:3]))} (DDPM family, "
                "diffusers' semantics) and 'karras' (EDM)."
            )
        if dynamic_threshold is not None and not (
            isinstance(dynamic_threshold, int | float)
            and not isinstance(dynamic_threshold, bool)
            and 0.0 < dynamic_threshold <= 1.0
        ):
            raise ValueError(
                f"`sampler.dynamic_threshold={dynamic_threshold!r}` is invalid; it must be null "
                "(off) or a percentile in (0, 1], e.g. 0.995 as in Imagen."
            )
        self.num_inference_steps = num_inference_steps
        self.timestep_spacing = timestep_spacing
        self.clip_sample = _flag(clip_sample, "clip_sample")
        self.dynamic_threshold = dynamic_threshold

    # -- configuration --------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Constructor arguments; subclasses add theirs."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "timestep_spacing": self.timestep_spacing,
            "clip_sample": self.clip_sample,
            "dynamic_threshold": self.dynamic_threshold,
        }

    def to_config(self) -> dict[str, Any]:
        return {"name": SAMPLERS.name_of(type(self)), **self.options()}

    def with_options(self, **changes: Any) -> Sampler:
        """A new sampler with some options changed (validated like any config); self is kept."""
        return SAMPLERS.build({**self.to_config(), **changes})

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({options})"

    # -- the loop ---------------------------------------------------------------------------
    def process_x0(self, x0: Tensor) -> Tensor:
        if self.dynamic_threshold is not None:
            s = torch.quantile(x0.abs().flatten(1), self.dynamic_threshold, dim=1).clamp(min=1.0)
            s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
            return torch.maximum(torch.minimum(x0, s), -s) / s
        if self.clip_sample:
            return x0.clamp(-1.0, 1.0)
        return x0

    def end_level(self, plan: SamplingPlan) -> NoiseLevel:
        return CLEAN

    @property
    def deterministic(self) -> bool:
        """True when the sampler draws no fresh noise, so that it integrates the probability-flow
        ODE and can run it backwards (DDIM inversion, flowerdiff.diffusion.editing)."""
        return False

    def _step(self, run: _Run, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """From ``plan.levels[i]`` to the next level; returns (new x, the x0 estimate used)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        plan: SamplingPlan,
        x: Tensor,
        generators: Sequence[torch.Generator] | None = None,
        return_intermediates: bool = False,
        progress: bool = False,
        project: Projection | None = None,
    ) -> SamplerOutput:
        """Run every step from ``x`` (the state at ``plan.levels[0]``) to ``plan.end`` (None:
        :meth:`end_level`); ``project`` maps the state after each step (before it is kept as
        an intermediate)."""
        name = type(self).__name__
        if generators is not None and len(generators) != x.shape[0]:
            raise ValueError(
                f"{name}.sample got {len(generators)} generators for a batch of {x.shape[0]}; "
                "pass one generator per image (make_generators) or None."
            )
        end = plan.end if plan.end is not None else self.end_level(plan)
        run = _Run(denoiser, plan, end, generators)
        out = SamplerOutput(images=x, levels=list(plan.levels))
        x = x.float()
        steps = range(len(plan.levels))
        for i in tqdm(steps, desc=name, disable=not progress, leave=False):
            x, x0 = self._step(run, i, x)
            if project is not None:
                x = project(x, run.next_level(i))
            if return_intermediates:
                reached = run.next_level(i)
                scale = math.hypot(reached.alpha, reached.sigma)
                out.intermediates.append(x if abs(scale - 1.0) < 1e-3 else x / scale)
                out.pred_x0.append(x0)
        out.state = x
        out.images = x.clamp(-1.0, 1.0)
        return out


@SAMPLERS.register("ddpm")
class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020) with the posterior variance.

    Between visited levels s -> p the step uses the posterior of the two-level process
    ``q(x_p | x_s, x0)``: with ``a = alpha_s / alpha_p`` and ``v = sigma_s^2 - a^2 sigma_p^2``,
    mean ``alpha_p v / sigma_s^2 x0 + a sigma_p^2 / sigma_s^2 x`` and variance
    ``v sigma_p^2 / sigma_s^2`` (diffusers' DDPMScheduler, "fixed_small", on VP levels).
    """

    default_steps = 1000  # the original method visits every timestep

    def _step(self, run: _Run, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        level, nxt = run.plan.levels[i], run.next_level(i)
        x0 = self.process_x0(run.denoiser(x, level))
        ratio = level.alpha_sq / nxt.alpha_sq  # a^2
        transition = level.sigma_sq - ratio * nxt.sigma_sq  # v
        mean = (math.sqrt(nxt.alpha_sq) * transition / level.sigma_sq) * x0 + (
            math.sqrt(ratio) * nxt.sigma_sq / level.sigma_sq
        ) * x
        variance = transition * nxt.sigma_sq / level.sigma_sq
        if variance <= 0.0:
            return mean, x0
        return mean + math.sqrt(variance) * run.noise_like(x), x0


@SAMPLERS.register("ddim")
class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021), ``eta`` interpolating between deterministic (0) and DDPM-like (1).

    Args:
        eta: noise scale (>= 0); the book uses 1.0.
        use_clipped_model_output: recompute the noise direction from the clipped/thresholded
            x0 (diffusers' option of the same name); otherwise from the raw estimate.
        final_alpha_one: True (diffusers' ``set_alpha_to_one``, which the book relies on) ends
            on clean data, i.e. the last x0 estimate; False ends at the family's lowest training
            level, keeping its small noise.
    """

    def __init__(
        self,
        num_inference_steps: int | None = None,
        timestep_spacing: str | None = None,
        clip_sample: bool = True,
        dynamic_threshold: float | None = None,
        eta: float = 1.0,
        use_clipped_model_output: bool = False,
        final_alpha_one: bool = True,
    ) -> None:
        super().__init__(num_inference_steps, timestep_spacing, clip_sample, dynamic_threshold)
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not eta >= 0.0:
            raise ValueError(
                f"`sampler.eta={eta!r}` (or `eta=`) is invalid; it must be a number >= 0 "
                "(0 = deterministic DDIM, 1 = DDPM-like stochastic sampling, the book's setting)."
            )
        self.eta = float(eta)
        self.use_clipped_model_output = _flag(use_clipped_model_output, "use_clipped_model_output")
        self.final_alpha_one = _flag(final_alpha_one, "final_alpha_one")

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "eta": self.eta,
            "use_clipped_model_output": self.use_clipped_model_output,
            "final_alpha_one": self.final_alpha_one,
        }

    def end_level(self, plan: SamplingPlan) -> NoiseLevel:
        return CLEAN if self.final_alpha_one else plan.lowest

    @property
    def deterministic(self) -> bool:
        return self.eta == 0.0

    def _step(self, run: _Run, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        level, nxt = run.plan.levels[i], run.next_level(i)
        raw = run.denoiser(x, level)
        x0 = self.process_x0(raw)
        eps = (x - level.alpha * (x0 if self.use_clipped_model_output else raw)) / level.sigma
        # sigma_eta of DDIM eq. (16): eta times the posterior std; the direction term keeps the
        # rest of the next level's noise (clamped at 0 for eta > 1). With eta = 0 the posterior
        # is not needed, nor defined when inversion steps up to a zero-SNR level.
        noise_std = 0.0
        if self.eta > 0.0:
            ratio = level.alpha_sq / nxt.alpha_sq
            posterior = (level.sigma_sq - ratio * nxt.sigma_sq) * nxt.sigma_sq / level.sigma_sq
            noise_std = self.eta * math.sqrt(max(posterior, 0.0))
        direction = math.sqrt(max(nxt.sigma_sq - noise_std**2, 0.0))
        x_next = math.sqrt(nxt.alpha_sq) * x0 + direction * eps
        if noise_std > 0.0:
            x_next = x_next + noise_std * run.noise_like(x)
        return x_next, x0


@SAMPLERS.register("dpm_solver")
class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep 2nd order, x0 prediction, in log-SNR.

    The first step (no history) and the final step are first order, as diffusers'
    DPMSolverMultistepScheduler with ``lower_order_final=True`` and ``final_sigmas_type="zero"``.
    Stepping uses exp(-h) - 1 (``expm1``), exact for infinite log-SNRs (zero terminal SNR at the
    start, clean data at the end). On the DDPM family it prefers "trailing" spacing: with
    "leading" the last step spans a much larger log-SNR gap and the error grows ~20x.
    """

    default_timestep_spacing = "trailing"
    default_steps = 20

    @property
    def deterministic(self) -> bool:
        return True

    def _step(self, run: _Run, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        level, nxt = run.plan.levels[i], run.next_level(i)
        x0 = self.process_x0(run.denoiser(x, level))
        lam = level.log_snr
        h = nxt.log_snr - lam
        phi = math.expm1(-h)  # exp(-h) - 1
        x_next = math.sqrt(nxt.sigma_sq / level.sigma_sq) * x - (math.sqrt(nxt.alpha_sq) * phi) * x0
        is_last = i == len(run.plan.levels) - 1
        if run.history is not None and not is_last:
            h_prev = lam - run.plan.levels[i - 1].log_snr
            d1 = (h / h_prev) * (x0 - run.history)  # (1 / r0) (m0 - m1), r0 = h_prev / h
            x_next = x_next - (0.5 * math.sqrt(nxt.alpha_sq) * phi) * d1
        run.history = x0
        return x_next, x0


@SAMPLERS.register("euler")
class EulerSampler(Sampler):
    """Euler on the probability-flow ODE in VE coordinates (EDM Algorithm 2 without the
    correction): y = x / alpha, s = sigma / alpha, dy/ds = (y - x0) / s. One network
    evaluation per step. On the DDPM family this is DDIM with eta = 0 (without clipping).

    Args:
        s_churn, s_min, s_max, s_noise: EDM's stochasticity. Levels with s_min <= s <= s_max
            are first raised to ``s (1 + gamma)`` with ``gamma = min(s_churn / N, sqrt(2) - 1)``
            by adding noise (times ``s_noise``); ``s_churn = 0`` is the deterministic ODE.
    """

    default_timestep_spacing = "trailing"
    second_order = False

    def __init__(
        self,
        num_inference_steps: int | None = None,
        timestep_spacing: str | None = None,
        clip_sample: bool = False,
        dynamic_threshold: float | None = None,
        s_churn: float = 0.0,
        s_min: float = 0.0,
        s_max: float = math.inf,
        s_noise: float = 1.0,
    ) -> None:
        super().__init__(num_inference_steps, timestep_spacing, clip_sample, dynamic_threshold)
        for key, value in (("s_churn", s_churn), ("s_min", s_min), ("s_max", s_max)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"`sampler.{key}={value!r}` must be a number >= 0.")
        if isinstance(s_noise, bool) or not isinstance(s_noise, int | float) or not s_noise > 0:
            raise ValueError(f"`sampler.s_noise={s_noise!r}` must be a number > 0 (EDM: 1.0).")
        self.s_churn = float(s_churn)
        self.s_min = float(s_min)
        self.s_max = float(s_max)
        self.s_noise = float(s_noise)

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "s_churn": self.s_churn,
            "s_min": self.s_min,
            "s_max": self.s_max,
            "s_noise": self.s_noise,
        }

    @property
    def deterministic(self) -> bool:
        return self.s_churn == 0.0

    def _step(self, run: _Run, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        level, nxt = run.plan.levels[i], run.next_level(i)
        if level.alpha == 0:
            raise ValueError(
                f"{type(self).__name__} steps in variance-exploding coordinates, but the first "
                "level holds no signal (zero terminal SNR). Use sampler=ddim or "
                "sampler=dpm_solver with zero_terminal_snr, or trailing spacing without it."
            )
        s, s_next = level.ve_sigma, nxt.ve_sigma
        y = x / level.alpha if level.alpha != 1.0 else x
        gamma = 0.0
        if self.s_churn > 0 and self.s_min <= s <= self.s_max:
            gamma = min(self.s_churn / len(run.plan.levels), math.sqrt(2) - 1)
        if gamma > 0:
            s_hat = s * (1 + gamma)
            level = run.plan.level_at_ve_sigma(s_hat)
            y = y + math.sqrt(s_hat**2 - s**2) * self.s_noise * run.noise_like(y)
            s = s_hat
        x0 = self.process_x0(run.denoiser(_scaled(y, level), level))
        slope = (y - x0) / s
        y_next = y + (s_next - s) * slope
        if self.second_order and s_next > 0:
            x0_next = self.process_x0(run.denoiser(_scaled(y_next, nxt), nxt))
            slope_next = (y_next - x0_next) / s_next
            y_next = y + (s_next - s) * (0.5 * slope + 0.5 * slope_next)
        return _scaled(y_next, nxt), x0


@SAMPLERS.register("heun")
class HeunSampler(EulerSampler):
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 2): Euler plus a trapezoidal
    correction, second order; N steps cost 2N - 1 network evaluations (the last step, to
    sigma = 0, is Euler)."""

    second_order = True
    default_steps = 18  # EDM's: 35 network evaluations


def _flag(value: object, key: str) -> bool:
    """A yes/no option: a real boolean (the string "false" is not False)."""
    if not isinstance(value, bool):
        raise ValueError(f"`sampler.{key}={value!r}` must be true or false.")
    return value


def _scaled(y: Tensor, level: NoiseLevel) -> Tensor:
    """VE coordinates back to the family's own: x = alpha * y."""
    return y if level.alpha == 1.0 else level.alpha * y
