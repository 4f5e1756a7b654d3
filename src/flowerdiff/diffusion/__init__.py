"""The diffusion process: families (DDPM, EDM), samplers, seeded noise, the analytic oracle.

Everything is built by registry name from plain config dicts (:func:`build_diffusion`), so a
checkpoint's stored config can only select among the classes registered here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowerdiff.diffusion.base import (
    CLEAN,
    Denoiser,
    Diffusion,
    NoiseLevel,
    SamplerOutput,
    SamplingPlan,
)
from flowerdiff.diffusion.ddpm import PREDICTION_TYPES, TIMESTEP_SPACINGS, DDPMDiffusion
from flowerdiff.diffusion.edm import EDMDiffusion
from flowerdiff.diffusion.noise import make_generators, randn_per_image
from flowerdiff.diffusion.samplers import SAMPLERS, Sampler
from flowerdiff.diffusion.schedules import SCHEDULES, NoiseSchedule
from flowerdiff.registry import Registry

DIFFUSIONS: Registry[Diffusion] = Registry("diffusion family", "diffusion")
DIFFUSIONS.register(DDPMDiffusion.name)(DDPMDiffusion)
DIFFUSIONS.register(EDMDiffusion.name)(EDMDiffusion)


def build_sampler(config: Mapping[str, Any]) -> Sampler:
    """A sampler from ``{"name": ..., **options}``."""
    return SAMPLERS.build(config)


def build_diffusion(
    config: Mapping[str, Any], sampler: Mapping[str, Any] | None = None
) -> Diffusion:
    """A diffusion family from its config; its default sampler from ``sampler`` or, when None,
    from the config's own ``sampler`` entry (as :meth:`Diffusion.to_config` writes it)."""
    config = dict(config)
    sampler_config = sampler if sampler is not None else config.pop("sampler", None)
    config.pop("sampler", None)
    if sampler_config is None:
        raise ValueError("`sampler` is missing: choose one, e.g. sampler=ddim.")
    return DIFFUSIONS.build(config, sampler=build_sampler(sampler_config))


__all__ = [
    "CLEAN",
    "DIFFUSIONS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULES",
    "TIMESTEP_SPACINGS",
    "DDPMDiffusion",
    "Denoiser",
    "Diffusion",
    "EDMDiffusion",
    "NoiseLevel",
    "NoiseSchedule",
    "Sampler",
    "SamplerOutput",
    "SamplingPlan",
    "build_diffusion",
    "build_sampler",
    "make_generators",
    "randn_per_image",
]
