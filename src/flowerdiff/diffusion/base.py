"""The boundary between a network, a diffusion process and a sampler.

A :class:`Diffusion` owns everything about the noise process: how data is noised, what the
network predicts and how its output becomes a clean-image estimate (``denoise``), the training
loss and its weighting, the grid of noise levels a sampler visits, and the default sampler. A
sampler sees none of that: it gets a *denoiser* ``(x, level) -> x0`` and a :class:`SamplingPlan`
of :class:`NoiseLevel` s, and steps between them. Every sampler therefore works with every
family, and a new parametrisation touches one class.

Notation: a noise level is a pair (alpha, sigma) with ``x = alpha * x0 + sigma * eps``. The DDPM
family is variance preserving (``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``), EDM is
variance exploding (``alpha = 1``). ``sigma / alpha`` is the common "VE" noise level that EDM's
samplers step in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# The network as the diffusion calls it: (x, conditioning value of the family, class labels).
Network = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class NoiseLevel:
    """One point of the forward process, ``x = alpha * x0 + sigma * eps``.

    ``t`` is the family's own coordinate, which the network is conditioned through: the
    timestep for the DDPM family, sigma for EDM. ``alpha`` and ``sigma`` are the coefficients
    applied to tensors; ``alpha_sq`` and ``sigma_sq`` (default: their squares) are what step
    coefficients are computed from. The DDPM family sets them from its float32 tables (alpha-bar
    and sqrt(alpha-bar) are each rounded once), so its steps compute exactly what they did when
    they read those tables directly.
    """

    t: float
    alpha: float
    sigma: float
    alpha_sq: float = -1.0
    sigma_sq: float = -1.0

    def __post_init__(self) -> None:
        if self.alpha_sq < 0:
            object.__setattr__(self, "alpha_sq", self.alpha**2)
        if self.sigma_sq < 0:
            object.__setattr__(self, "sigma_sq", self.sigma**2)

    @property
    def ve_sigma(self) -> float:
        """sigma / alpha: the noise level in variance-exploding coordinates (inf when alpha=0)."""
        return math.inf if self.alpha == 0 else self.sigma / self.alpha

    @property
    def log_snr(self) -> float:
        """lambda = log(alpha / sigma): +inf on clean data, -inf on pure noise."""
        if self.sigma_sq == 0:
            return math.inf
        if self.alpha_sq == 0:
            return -math.inf
        return 0.5 * (math.log(self.alpha_sq) - math.log(self.sigma_sq))


CLEAN = NoiseLevel(t=0.0, alpha=1.0, sigma=0.0)

# What samplers call: the current state and its level -> the clean-image estimate (float32).
Denoiser = Callable[[Tensor, NoiseLevel], Tensor]
# An exact E[x0 | x] given per-sample coefficients (x, alpha, sigma), for the analytic oracles.
CleanEstimate = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SamplingPlan:
    """What a family hands a sampler: the levels to visit and how to find other ones."""

    levels: list[NoiseLevel]  # visited in order, noisiest first; one network call each (Euler)
    lowest: NoiseLevel  # the least noisy level the network was trained on
    level_at_ve_sigma: Callable[[float], NoiseLevel]  # for samplers that add noise (churn)
    # Where the step after the last level goes; None: the sampler's own end (clean data). Set
    # by editing (flowerdiff.diffusion.editing) to run part of a plan, or one in reverse.
    end: NoiseLevel | None = None


@dataclass
class SamplerOutput:
    """Result of a sampler run."""

    images: Tensor  # final sample, clamped to [-1, 1]
    levels: list[NoiseLevel]  # the levels visited, noisiest first
    labels: list[str] = field(default_factory=list)  # one caption per level, e.g. "t=800"
    intermediates: list[Tensor] = field(default_factory=list)  # x after each step, unit scale
    pred_x0: list[Tensor] = field(default_factory=list)  # x0 estimate used at each step
    state: Tensor | None = None  # x after the last step, unclamped (e.g. an inversion's noise)


class Diffusion(nn.Module, ABC):
    """A diffusion family: the noise process, the network's parametrisation, the loss.

    Subclasses are registered in :data:`flowerdiff.diffusion.DIFFUSIONS` and built by name;
    :meth:`to_config` gives back the plain dict that rebuilds them (what checkpoints store).
    """

    name: str  # registry name, set by the registry decorator's class

    def __init__(self, sampler: Any) -> None:
        super().__init__()
        self.sampler = sampler

    # -- the network ------------------------------------------------------------------------
    @abstractmethod
    def denoise(
        self, net: Network, x: Tensor, level: NoiseLevel, cond: Tensor | None = None
    ) -> Tensor:
        """The network's clean-image estimate at ``level`` (float32, same shape as ``x``)."""

    @abstractmethod
    def network_for(self, clean_estimate: CleanEstimate) -> Network:
        """The parametrisation inverted: a network whose :meth:`denoise` is
        ``clean_estimate(x, alpha, sigma)`` (per-sample [B, 1, ...] coefficients). The analytic
        oracles plug in this way, and then train, sample and score like a trained network."""

    # -- training ---------------------------------------------------------------------------
    @abstractmethod
    def loss(
        self,
        net: Network,
        x0: Tensor,
        cond: Tensor | None = None,
        noise: Tensor | None = None,
        levels: Tensor | None = None,
    ) -> Tensor:
        """Scalar training loss of ``x0``; random ``levels`` (family coordinate, [B]) and
        ``noise`` unless given (validation fixes both)."""

    @abstractmethod
    def validation_levels(self, indices: Tensor) -> Tensor:
        """A fixed training level per validation image (indexed by its data-set index), so the
        validation loss compares across epochs and runs."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, level: NoiseLevel) -> Tensor:
        """A sample of the forward process at ``level``."""

    # -- sampling ---------------------------------------------------------------------------
    @abstractmethod
    def plan(self, sampler: Any) -> SamplingPlan:
        """The levels ``sampler`` visits (its step count and spacing, on this family's grid)."""

    @abstractmethod
    def level_at_progress(self, progress: float) -> NoiseLevel:
        """The training level a fraction ``progress`` of the way from pure noise (0) to clean
        data (1): forward-diffusion figures, trajectory columns, image-to-image strength."""

    @abstractmethod
    def progress(self, level: NoiseLevel) -> float:
        """Inverse of :meth:`level_at_progress` (1 for clean data)."""

    @abstractmethod
    def describe(self, level: NoiseLevel) -> str:
        """A short caption such as ``t=800`` or ``σ=1.2``."""

    @abstractmethod
    def initial_state(self, noise: Tensor, level: NoiseLevel) -> Tensor:
        """x at the first (noisiest) level, from standard normal ``noise``."""

    def denoiser(self, net: Network, cond: Tensor | None = None) -> Denoiser:
        """``net`` as samplers see it: ``(x, level) -> x0``."""

        def denoise(x: Tensor, level: NoiseLevel) -> Tensor:
            return self.denoise(net, x, level, cond)

        return denoise

    def sample(
        self,
        denoiser: Denoiser,
        noise: Tensor,
        sampler: Any = None,
        generators: Sequence[torch.Generator] | None = None,
        return_intermediates: bool = False,
        progress: bool = False,
    ) -> SamplerOutput:
        """Denoise standard normal ``noise`` (drawn by the caller) into images with
        ``sampler`` (default: this family's own)."""
        sampler = sampler or self.sampler
        plan = self.plan(sampler)
        out = sampler.sample(
            denoiser,
            plan,
            self.initial_state(noise, plan.levels[0]),
            generators=generators,
            return_intermediates=return_intermediates,
            progress=progress,
        )
        out.labels = [self.describe(level) for level in out.levels]
        return out

    # -- configuration ----------------------------------------------------------------------
    @abstractmethod
    def family_config(self) -> dict[str, Any]:
        """This family's own constructor arguments, as plain values."""

    def to_config(self) -> dict[str, Any]:
        """Plain dict that rebuilds this diffusion (sampler included): what checkpoints store."""
        return {"name": self.name, **self.family_config(), "sampler": self.sampler.to_config()}


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1], broadcasting against ``like``."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
