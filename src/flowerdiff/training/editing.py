"""Editing a trained model: image-to-image, inpainting and interpolation (seeds or images).

The algorithms are :mod:`flowerdiff.diffusion.editing`'s; here they run on a
:class:`~flowerdiff.training.module.DiffusionModule` with what sampling adds: each image's noise
comes from the generator of ``(seed, start_index + k)`` (so a result does not depend on its
batch), class labels and classifier-free guidance for conditional models, and autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flowerdiff.diffusion.base import SamplerOutput
from flowerdiff.diffusion.editing import (
    check_deterministic,
    invert,
    repaint,
    sample_from,
    sdedit,
    slerp,
)
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.diffusion.noise import make_generators, randn_per_image
from flowerdiff.diffusion.samplers import Sampler
from flowerdiff.training.module import DiffusionModule

Autocast = Callable[[], contextlib.AbstractContextManager]


def _labels_for(labels: Sequence[int] | Tensor | int | None, count: int) -> Tensor | None:
    """One label per image: a single class for all, or one each."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) == 1:
        return labels.expand(count).clone()
    if len(labels) != count:
        raise ValueError(f"{len(labels)} class labels for {count} images: give one or one each.")
    return labels


def _model_images(module: DiffusionModule, images: Tensor, what: str) -> Tensor:
    """``images`` [B, C, H, W] (or one [C, H, W]) in [-1, 1] of the model's shape, on its
    device."""
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[None]
    if tuple(images.shape[1:]) != module.image_shape:
        raise ValueError(
            f"{what} has shape {tuple(images.shape[1:])}; this model makes images of shape "
            f"{module.image_shape} ([C, H, W]). Resize it first (flowerdiff.tasks.explore."
            "to_model_image does it as training does)."
        )
    if images.dtype == torch.uint8 or images.min() < -1.001 or images.max() > 1.001:
        raise ValueError(f"{what} must be a float tensor in [-1, 1] (model space).")
    return images.to(module.device, torch.float32)


@torch.no_grad()
def image_to_image(
    module: DiffusionModule,
    images: Tensor,
    strength: float,
    seed: int = 0,
    start_index: int = 0,
    sampler: Sampler | None = None,
    labels: Sequence[int] | Tensor | int | None = None,
    guidance: Guidance | None = None,
    autocast: Autocast = contextlib.nullcontext,
    return_intermediates: bool = False,
    progress: bool = False,
) -> SamplerOutput:
    """SDEdit with ``module`` (:func:`sdedit`); image ``k`` uses the generator of
    ``(seed, start_index + k)``, so its result does not depend on the batch."""
    images = _model_images(module, images, "The input image")
    generators = make_generators(seed, start_index, len(images))
    denoiser = module.denoiser(_labels_for(labels, len(images)), guidance)
    with autocast():
        return sdedit(
            module.diffusion,
            denoiser,
            images,
            strength,
            sampler,
            generators,
            return_intermediates,
            progress,
        )


@torch.no_grad()
def inpaint(
    module: DiffusionModule,
    images: Tensor,
    mask: Tensor,
    seed: int = 0,
    start_index: int = 0,
    sampler: Sampler | None = None,
    labels: Sequence[int] | Tensor | int | None = None,
    guidance: Guidance | None = None,
    jump_length: int = 10,
    resample: int = 1,
    autocast: Autocast = contextlib.nullcontext,
    return_intermediates: bool = False,
    progress: bool = False,
) -> SamplerOutput:
    """RePaint inpainting with ``module`` (:func:`repaint`): 1 in ``mask`` = generate."""
    images = _model_images(module, images, "The input image")
    generators = make_generators(seed, start_index, len(images))
    denoiser = module.denoiser(_labels_for(labels, len(images)), guidance)
    with autocast():
        return repaint(
            module.diffusion,
            denoiser,
            images,
            mask,
            sampler,
            generators,
            jump_length,
            resample,
            return_intermediates,
            progress,
        )


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    values = [float(f) for f in fractions]
    if not values or any(not 0.0 <= f <= 1.0 for f in values):
        raise ValueError(
            f"interpolation fractions {list(fractions)} must be a non-empty list of numbers in "
            "[0, 1] (0: the first end, 1: the second)."
        )
    return values


@torch.no_grad()
def interpolate_seeds(
    module: DiffusionModule,
    seed_a: int,
    seed_b: int,
    fractions: Sequence[float],
    index: int = 0,
    sampler: Sampler | None = None,
    label: int | None = None,
    guidance: Guidance | None = None,
    autocast: Autocast = contextlib.nullcontext,
    return_intermediates: bool = False,
    progress: bool = False,
) -> SamplerOutput:
    """One image per fraction, from the slerp of image ``index``'s noise under ``seed_a`` and
    ``seed_b``. Fraction 0 is exactly image ``index`` of ``seed_a`` (as sampled); fraction 1
    is ``seed_b``'s for deterministic samplers (stochastic ones take their fresh noise from
    ``seed_a``'s generator for every frame, which keeps the path smooth)."""
    fractions = _check_fractions(fractions)
    shape = (1, *module.image_shape)
    ends = []
    for seed in (seed_a, seed_b):
        ends.append(randn_per_image(shape, make_generators(seed, index, 1), module.device))
    noise = torch.cat([slerp(ends[0], ends[1], f) for f in fractions])
    generators = []
    for _ in fractions:  # seed_a's generator, past the starting noise it drew
        (generator,) = make_generators(seed_a, index, 1)
        randn_per_image(shape, [generator], "cpu")
        generators.append(generator)
    labels = _labels_for(label, len(fractions))
    denoiser = module.denoiser(labels, guidance)
    with autocast():
        return module.diffusion.sample(
            denoiser,
            noise,
            sampler=sampler,
            generators=generators,
            return_intermediates=return_intermediates,
            progress=progress,
        )


@torch.no_grad()
def interpolate_images(
    module: DiffusionModule,
    image_a: Tensor,
    image_b: Tensor,
    fractions: Sequence[float],
    sampler: Sampler | None = None,
    label: int | None = None,
    guidance: Guidance | None = None,
    autocast: Autocast = contextlib.nullcontext,
    return_intermediates: bool = False,
    progress: bool = False,
) -> SamplerOutput:
    """One image per fraction between two images: both are inverted with the deterministic
    ``sampler`` (:func:`invert`), their states are slerped, and each is sampled back. The ends
    reconstruct the two images up to the sampler's error."""
    fractions = _check_fractions(fractions)
    sampler = sampler or module.diffusion.sampler
    check_deterministic(sampler, "Image interpolation (through inversion)")
    pair = torch.cat(
        [
            _model_images(module, image_a, "The first image"),
            _model_images(module, image_b, "The second image"),
        ]
    )
    if len(pair) != 2:
        raise ValueError("Image interpolation takes one image at each end.")
    with autocast():
        states = invert(
            module.diffusion,
            module.denoiser(_labels_for(label, 2), guidance),
            pair,
            sampler,
            progress,
        )
        path = torch.cat([slerp(states[:1], states[1:], f) for f in fractions])
        return sample_from(
            module.diffusion,
            module.denoiser(_labels_for(label, len(fractions)), guidance),
            path,
            sampler,
            None,
            return_intermediates,
            progress,
        )
