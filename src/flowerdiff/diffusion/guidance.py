"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper: every sampler gets it.

``D_w = D_u + w (D_c - D_u)`` on the clean-image estimate, with ``D_c`` the conditional and
``D_u`` the unconditional ("null" class) denoiser, both from one batched forward pass of the
doubled batch. w = 1 is the plain conditional model, w = 0 the unconditional one. Because
x0, epsilon and v are affine in each other at a fixed (x, level), guiding x0 is the same as
guiding the noise prediction.

Options: a guidance *interval* (Kynkäänniemi et al. 2024: guide only where the VE noise level
sigma/alpha lies in ``(low, high]``, the plain conditional model elsewhere) and CFG-rescale
(Lin et al. 2023: scale the guided estimate back to the conditional one's per-image std, mixed
in with weight ``rescale``), here applied to the x0 estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowerdiff.diffusion.base import Denoiser, Diffusion, Network, NoiseLevel


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings.

    Args:
        scale: w; 1 = conditional, 0 = unconditional, > 1 stronger class adherence.
        interval: (low, high) VE noise levels where guidance applies; None: everywhere.
        rescale: CFG-rescale weight phi in [0, 1] (0: off; Lin et al. suggest 0.7).
    """

    scale: float = 1.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, int | float)
            or not (math.isfinite(self.scale) and self.scale >= 0)
        ):
            raise ValueError(
                f"`guidance_scale={self.scale!r}` must be a number >= 0 (1 = plain conditional "
                "sampling, 0 = unconditional, 2-5 = typical guidance)."
            )
        if self.interval is not None:
            if not (isinstance(self.interval, Sequence) and len(self.interval) == 2):
                raise ValueError(
                    f"`guidance_interval={self.interval!r}` must be null or [low, high] noise "
                    "levels (sigma / alpha), e.g. [0.28, 5.42] as in Kynkäänniemi et al."
                )
            low, high = (float(v) for v in self.interval)
            if not 0 <= low < high:
                raise ValueError(
                    f"`guidance_interval={list(self.interval)}` needs 0 <= low < high."
                )
            object.__setattr__(self, "interval", (low, high))
        if (
            isinstance(self.rescale, bool)
            or not isinstance(self.rescale, int | float)
            or not 0.0 <= self.rescale <= 1.0
        ):
            raise ValueError(f"`guidance_rescale={self.rescale!r}` must be in [0, 1].")

    def active(self, level: NoiseLevel) -> bool:
        if self.interval is None:
            return True
        low, high = self.interval
        return low < level.ve_sigma <= high

    def combine(self, conditional: Tensor, unconditional: Tensor) -> Tensor:
        guided = unconditional + self.scale * (conditional - unconditional)
        if self.rescale > 0:
            dims = tuple(range(1, guided.ndim))
            ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        return guided

    def denoiser(
        self, diffusion: Diffusion, net: Network, labels: Tensor, null_label: int
    ) -> Denoiser:
        """The guided denoiser for ``labels`` [B]; ``null_label`` is the unconditional class."""
        null = torch.full_like(labels, null_label)

        def guided(x: Tensor, level: NoiseLevel) -> Tensor:
            if self.scale == 1.0 or not self.active(level):
                return diffusion.denoise(net, x, level, labels)
            if self.scale == 0.0:
                return diffusion.denoise(net, x, level, null)
            both = diffusion.denoise(net, torch.cat([x, x]), level, torch.cat([labels, null]))
            conditional, unconditional = both.chunk(2)
            return self.combine(conditional, unconditional)

        return guided
