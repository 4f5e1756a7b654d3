"""Diffusion core: noise schedules, the training loss and the reverse-process samplers."""

from flowerdiff.diffusion.losses import DiffusionLoss
from flowerdiff.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    Sampler,
    SamplerOutput,
    make_generators,
    randn_per_image,
)
from flowerdiff.diffusion.schedules import PREDICTION_TYPES, SCHEDULE_NAMES, NoiseSchedule

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULE_NAMES",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "DiffusionLoss",
    "NoiseSchedule",
    "Sampler",
    "SamplerOutput",
    "make_generators",
    "randn_per_image",
]
