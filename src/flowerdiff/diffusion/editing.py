"""Editing with a diffusion model: image-to-image, inpainting, interpolation and inversion.

Every operation is built from the same two pieces as sampling, a denoiser ``(x, level) -> x0``
and a sampler stepping over a :class:`~flowerdiff.diffusion.base.SamplingPlan`, so each works
for both families (DDPM, EDM), every sampler, and conditional models with guidance (the
denoiser carries the labels). Only the plan changes:

* **image-to-image** (SDEdit, Meng et al. 2022): noise the image to the level
  ``level_at_progress(1 - strength)`` and run the sampler over the plan's levels below it
  (:func:`starting_at`);
* **inpainting** (RePaint, Lugmayr et al. 2022): sample as usual, but after every step put the
  known pixels back, noised to the level just reached (the sampler's ``project`` hook); with
  ``resample > 1`` the sampler also jumps back ``jump_length`` levels by forward noising and
  descends again, so that the generated region harmonises with the known one
  (:func:`repaint_schedule`);
* **inversion** (DDIM inversion, Song et al. 2021): a deterministic sampler run on the reversed
  plan integrates the probability-flow ODE from the image to noise (:func:`inversion_plan`);
  sampling from that noise gives the image back up to the solver's error;
* **interpolation**: spherical interpolation (:func:`slerp`) between two seeds' noise, or
  between two images' inverted noise.

Randomness is seeded as in sampling (:mod:`flowerdiff.diffusion.noise`): one CPU generator per
image draws the image's noise and then every fresh noise its steps need, so an image's result
depends only on its seed and index, never on the batch it is computed in.

These are the algorithms, taking ``(diffusion, denoiser, ...)`` (the analytic tests plug exact
denoisers in); :mod:`flowerdiff.training.editing` runs them on a trained model, adding seeds,
class labels, guidance and autocast as :meth:`DiffusionModule.sample` does for sampling.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowerdiff.diffusion.base import Denoiser, Diffusion, NoiseLevel, SamplerOutput, SamplingPlan
from flowerdiff.diffusion.noise import randn_per_image
from flowerdiff.diffusion.samplers import DDIMSampler, Projection, Sampler

Generators = Sequence[torch.Generator] | None
Autocast = Callable[[], contextlib.AbstractContextManager]


# -- plans ------------------------------------------------------------------------------------
def starting_at(plan: SamplingPlan, start: NoiseLevel) -> SamplingPlan:
    """``plan`` from ``start`` on: ``start``, then the plan's levels less noisy than it."""
    rest = [level for level in plan.levels if level.ve_sigma < start.ve_sigma]
    return replace(plan, levels=[start, *rest])


def inversion_plan(plan: SamplingPlan) -> SamplingPlan:
    """``plan`` backwards: from the lowest training level (where a clean image is taken to be;
    the network is not defined at sigma = 0) up through the visited levels, ending at the first
    one, where sampling starts."""
    up = list(reversed(plan.levels))
    if up[0].ve_sigma > plan.lowest.ve_sigma:
        up.insert(0, plan.lowest)
    return replace(plan, levels=up[:-1], end=up[-1])


def repaint_schedule(num_levels: int, jump_length: int = 10, resample: int = 1) -> list[int]:
    """The positions RePaint visits (Lugmayr et al. 2022, their ``get_schedule_jump``): 0 is the
    first plan level, ``num_levels`` the end (clean data). Going down one position is a sampler
    step; going up is forward noising. After reaching a level ``p >= jump_length`` that lies a
    multiple of ``jump_length`` above the last one (``num_levels - 1``), the walk jumps back
    ``jump_length`` levels and descends again, ``resample - 1`` times. ``resample=1``: a plain
    descent, the inpainting cost equals sampling; otherwise it costs about
    ``(resample - 1) * jump_length`` extra steps per jump point.
    """
    for key, value in (
        ("num_levels", num_levels),
        ("jump_length", jump_length),
        ("resample", resample),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{key}={value!r}` must be an integer >= 1.")
    remaining = {
        p: resample - 1
        for p in range(num_levels - 1, jump_length - 1, -jump_length)
        if resample > 1
    }
    positions, p = [0], 0
    while p < num_levels:
        p += 1
        positions.append(p)
        if remaining.get(p, 0) > 0:
            remaining[p] -= 1
            for _ in range(jump_length):
                p -= 1
                positions.append(p)
    return positions


# -- small pieces -----------------------------------------------------------------------------
def slerp(a: Tensor, b: Tensor, fraction: float) -> Tensor:
    """Spherical interpolation between ``a`` and ``b`` ([B, ...], per image), the path along
    which Gaussian noise keeps its norm (a straight line would shrink it and blur the images).
    Exactly ``a`` at 0 and ``b`` at 1; nearly parallel vectors are interpolated linearly."""
    if not (isinstance(fraction, int | float) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"interpolation fraction {fraction!r} must be a number in [0, 1].")
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of one shape; got {a.shape} and {b.shape}.")
    x, y = a.double().flatten(1), b.double().flatten(1)
    cosine = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp(min=1e-30)
    theta = cosine.clamp(-1.0, 1.0).acos()
    sine = theta.sin()
    linear = sine < 1e-6
    safe = torch.where(linear, torch.ones_like(sine), sine)
    weight_a = torch.where(linear, 1.0 - fraction, ((1.0 - fraction) * theta).sin() / safe)
    weight_b = torch.where(linear, float(fraction), (fraction * theta).sin() / safe)
    out = weight_a[:, None] * x + weight_b[:, None] * y
    return out.reshape(a.shape).to(a.dtype)


def forward_jump(x: Tensor, low: NoiseLevel, high: NoiseLevel, generators: Generators) -> Tensor:
    """A draw of the forward process from ``low`` up to the noisier ``high``:
    ``x_high = a x_low + sqrt(sigma_high^2 - a^2 sigma_low^2) z`` with ``a = alpha_high /
    alpha_low``."""
    ratio_sq = high.alpha_sq / low.alpha_sq
    variance = max(high.sigma_sq - ratio_sq * low.sigma_sq, 0.0)
    noise = randn_per_image(x.shape, generators, x.device)
    return math.sqrt(ratio_sq) * x + math.sqrt(variance) * noise


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise ValueError(f"`strength={strength!r}` must be a number in [0, 1].")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"`strength={strength}` must be in [0, 1]: 0 keeps the image, 1 replaces it by a new "
            "sample; 0.3-0.7 changes details and keeps the layout."
        )
    return float(strength)


def check_mask(mask: Tensor, images: Tensor) -> Tensor:
    """A float mask broadcastable to ``images`` [B, C, H, W]: 1 = generate, 0 = keep."""
    mask = torch.as_tensor(mask).to(images.device)
    given = tuple(mask.shape)
    while mask.ndim < images.ndim:
        mask = mask.unsqueeze(0)
    if mask.ndim != images.ndim or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"The inpainting mask has shape {given}; it must cover the images "
            f"{tuple(images.shape[-2:])} ([H, W], [1, H, W] or [B, 1, H, W]; 1 = generate)."
        )
    try:
        torch.broadcast_shapes(mask.shape, images.shape)
    except RuntimeError as error:
        raise ValueError(
            f"The inpainting mask of shape {given} does not fit the images {tuple(images.shape)}."
        ) from error
    mask = mask.float()
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError("The inpainting mask must hold values in [0, 1] (1 = generate).")
    return mask


def check_deterministic(sampler: Sampler, what: str) -> None:
    if not sampler.deterministic:
        raise ValueError(
            f"{what} needs a deterministic sampler, which follows the probability-flow ODE and "
            f"can run it backwards; {sampler!r} adds fresh noise. Use ddim with eta=0, euler or "
            "heun with s_churn=0, or dpm_solver."
        )


def _run(
    diffusion: Diffusion,
    sampler: Sampler,
    denoiser: Denoiser,
    plan: SamplingPlan,
    x: Tensor,
    generators: Generators,
    return_intermediates: bool,
    progress: bool,
    project: Projection | None = None,
) -> SamplerOutput:
    out = sampler.sample(
        denoiser,
        plan,
        x,
        generators=generators,
        return_intermediates=return_intermediates,
        progress=progress,
        project=project,
    )
    out.labels = [diffusion.describe(level) for level in out.levels]
    return out


# -- the algorithms (any denoiser) ------------------------------------------------------------
def sdedit(
    diffusion: Diffusion,
    denoiser: Denoiser,
    images: Tensor,
    strength: float,
    sampler: Sampler | None = None,
    generators: Generators = None,
    return_intermediates: bool = False,
    progress: bool = False,
) -> SamplerOutput:
    """Image-to-image: ``images`` ([-1, 1]) noised to ``level_at_progress(1 - strength)``
    (the noise drawn from ``generators``), then denoised by ``sampler`` over the rest of its
    plan. Strength 0 returns the images as they are (no network call); strength 1 starts
    from the noisiest training level, where almost nothing of the image is left."""
    strength = check_strength(strength)
    images = images.float()
    if strength == 0.0:
        return SamplerOutput(images=images.clamp(-1.0, 1.0), levels=[], state=images)
    sampler = sampler or diffusion.sampler
    start = diffusion.level_at_progress(1.0 - strength)
    plan = starting_at(diffusion.plan(sampler), start)
    noise = randn_per_image(images.shape, generators, images.device)
    x = diffusion.add_noise(images, noise, start)
    return _run(diffusion, sampler, denoiser, plan, x, generators, return_intermediates, progress)


def repaint(
    diffusion: Diffusion,
    denoiser: Denoiser,
    images: Tensor,
    mask: Tensor,
    sampler: Sampler | None = None,
    generators: Generators = None,
    jump_length: int = 10,
    resample: int = 1,
    return_intermediates: bool = False,
    progress: bool = False,
) -> SamplerOutput:
    """Inpainting: generate where ``mask`` is 1, keep ``images`` where it is 0.

    The state starts as the sampler's prior noise; after every step the known pixels are
    replaced by the input noised to the level just reached (fresh noise each time), so the
    network always sees a consistent noisy image. ``resample`` / ``jump_length`` add RePaint's
    jumps back (:func:`repaint_schedule`). The result holds the input exactly where ``mask`` is
    0. Intermediates (for trajectory figures) are those of the last pass over each level.
    """
    images = images.float()
    mask = check_mask(mask, images)
    sampler = sampler or diffusion.sampler
    plan = diffusion.plan(sampler)
    positions = repaint_schedule(len(plan.levels), jump_length, resample)
    steps = sum(b > a for a, b in itertools.pairwise(positions))
    bar = tqdm(total=steps, desc="Inpainting", disable=not progress, leave=False)

    def known(level: NoiseLevel) -> Tensor:
        if level.sigma == 0:
            return images
        noise = randn_per_image(images.shape, generators, images.device)
        return diffusion.add_noise(images, noise, level)

    def project(x: Tensor, level: NoiseLevel) -> Tensor:
        bar.update(1)
        return mask * x + (1 - mask) * known(level)

    noise = randn_per_image(images.shape, generators, images.device)
    first = plan.levels[0]
    x = mask * diffusion.initial_state(noise, first) + (1 - mask) * known(first)
    kept: dict[int, tuple[Tensor, Tensor]] = {}
    out: SamplerOutput | None = None
    i = 0
    while i < len(positions) - 1:
        direction = 1 if positions[i + 1] > positions[i] else -1
        j = i + 1
        while j + 1 < len(positions) and positions[j + 1] == positions[j] + direction:
            j += 1
        start, stop = positions[i], positions[j]
        if direction > 0:  # sampler steps from level `start` down to position `stop`
            end = plan.levels[stop] if stop < len(plan.levels) else None
            segment = replace(plan, levels=plan.levels[start:stop], end=end)
            out = sampler.sample(
                denoiser, segment, x, generators, return_intermediates, project=project
            )
            assert out.state is not None
            x = out.state
            for k, (state, x0) in enumerate(zip(out.intermediates, out.pred_x0, strict=True)):
                kept[start + k] = (state, x0)
        else:  # RePaint's jump back up, by the forward process
            x = forward_jump(x, plan.levels[start], plan.levels[stop], generators)
        i = j
    bar.close()
    assert out is not None
    result = SamplerOutput(
        images=(mask * out.images + (1 - mask) * images.clamp(-1.0, 1.0)),
        levels=list(plan.levels),
        labels=[diffusion.describe(level) for level in plan.levels],
        state=x,
    )
    if return_intermediates:
        result.intermediates = [kept[i][0] for i in range(len(plan.levels))]
        result.pred_x0 = [kept[i][1] for i in range(len(plan.levels))]
    return result


def invert(
    diffusion: Diffusion,
    denoiser: Denoiser,
    images: Tensor,
    sampler: Sampler | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM inversion: the state at the plan's first level from which the deterministic
    ``sampler`` (DDIM eta=0, Euler/Heun without churn, DPM-Solver) gives back ``images``, up to
    its discretisation error: the same sampler steps the probability-flow ODE upwards
    (:func:`inversion_plan`)."""
    sampler = sampler or diffusion.sampler
    check_deterministic(sampler, "Inversion")
    plan = inversion_plan(diffusion.plan(sampler))
    if plan.end is not None and plan.end.alpha == 0 and not isinstance(sampler, DDIMSampler):
        raise ValueError(
            f"{type(sampler).__name__} cannot step up to this model's first level, which holds "
            "no signal (zero terminal SNR): Euler/Heun step in variance-exploding coordinates "
            "and DPM-Solver in log-SNR, both infinite there. Invert with sampler=ddim (eta=0)."
        )
    out = sampler.sample(denoiser, plan, images.float(), None, progress=progress)
    assert out.state is not None
    return out.state


def sample_from(
    diffusion: Diffusion,
    denoiser: Denoiser,
    state: Tensor,
    sampler: Sampler | None = None,
    generators: Generators = None,
    return_intermediates: bool = False,
    progress: bool = False,
) -> SamplerOutput:
    """Run ``sampler`` over its whole plan from ``state`` at the plan's first level (an
    inverted image, or an interpolation of two), not from prior noise."""
    sampler = sampler or diffusion.sampler
    plan = diffusion.plan(sampler)
    return _run(
        diffusion, sampler, denoiser, plan, state, generators, return_intermediates, progress
    )
