"""The one batched, seeded, sharded sampling loop: FID, evaluate, sample, notebooks, the app.

Image ``i`` of seed ``s`` depends only on ``(s, i)`` (its own noise generator) and, for a
conditional model, on its label, so every consumer that asks for images ``a .. b`` of a seed
gets the same pixels, whatever its batch size, device or number of ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowerdiff.diffusion import Sampler, SamplerOutput
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.training.module import DiffusionModule


def shard(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of rank ``rank``'s contiguous share of ``total`` items."""
    base, extra = divmod(total, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def balanced_labels(num_images: int, num_classes: int) -> Tensor:
    """Image ``i`` gets class ``i mod num_classes``: every class equally often, and a prefix of
    the sequence (or a rank's shard) stays close to balanced."""
    return torch.arange(num_images) % num_classes


def resolve_labels(
    module: DiffusionModule,
    num_images: int,
    class_labels: Sequence[int] | None = None,
    per_class: int | None = None,
) -> Tensor | None:
    """One label per image for a conditional model: ``class_labels`` repeated ``per_class``
    times each (one grid row per class), else ``class_labels`` cycled over ``num_images``, else
    every class in turn (class-balanced); None for an unconditional model."""
    num_classes = module.num_classes
    if num_classes is None:
        if class_labels is not None or per_class is not None:
            module.check_labels(torch.zeros(1, dtype=torch.long))  # raises: unconditional
        return None
    if per_class is not None and (
        isinstance(per_class, bool) or int(per_class) != per_class or per_class < 1
    ):
        raise ValueError(f"`per_class={per_class!r}` must be null or an integer >= 1.")
    if class_labels is not None:
        labels = module.check_labels(torch.as_tensor(list(class_labels)))
        if len(labels) == 0:
            raise ValueError("`class_labels=[]` names no class; give at least one, or null.")
        if per_class is not None:
            return labels.repeat_interleave(int(per_class))
        return labels.repeat(-(-num_images // len(labels)))[:num_images]
    if per_class is not None:
        return torch.arange(num_classes).repeat_interleave(int(per_class))
    return balanced_labels(num_images, num_classes)


def evaluation_conditioning(
    module: DiffusionModule,
    num_images: int,
    scale: float | None,
    interval: tuple[float, float] | None = None,
) -> tuple[Tensor | None, Guidance | None]:
    """Labels and guidance for scoring a model: every class in turn for a conditional model,
    with classifier-free guidance at ``scale`` (None: plain conditional); (None, None) for an
    unconditional one. evaluate.py and the race score conditional models alike through it."""
    labels = resolve_labels(module, num_images)
    if labels is None or scale is None:
        return labels, None
    return labels, Guidance(scale, interval)


@dataclass(frozen=True)
class Batch:
    """One batch of the seeded sequence: images ``start .. start + len(images)``."""

    start: int
    output: SamplerOutput
    labels: Tensor | None


def sample_batches(
    module: DiffusionModule,
    num_images: int,
    seed: int = 0,
    start_index: int = 0,
    batch_size: int = 64,
    sampler: Sampler | None = None,
    labels: Sequence[int] | Tensor | None = None,
    guidance: Guidance | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    trajectory_images: int = 0,
    progress: bool = False,
) -> Iterator[Batch]:
    """Sample images ``start_index .. start_index + num_images`` in batches.

    Args:
        labels: one class label per image (conditional models), or None.
        guidance: classifier-free guidance (needs labels), or None.
        autocast: a context factory for the forward passes (the trainer's precision).
        trajectory_images: the first batch also returns its intermediate states, for figures.
    """
    if num_images < 0 or batch_size < 1:
        raise ValueError(f"num_images={num_images} must be >= 0 and batch_size={batch_size} >= 1.")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) != num_images:
            raise ValueError(f"{len(labels)} labels for {num_images} images: give one per image.")
    bar = tqdm(total=num_images, desc="Sampling", unit="img", disable=not progress)
    for offset in range(0, num_images, batch_size):
        n = min(batch_size, num_images - offset)
        batch_labels = labels[offset : offset + n] if labels is not None else None
        with autocast():
            out = module.sample(
                n,
                seed=seed,
                start_index=start_index + offset,
                sampler=sampler,
                class_labels=batch_labels,
                guidance=guidance,
                return_intermediates=offset == 0 and trajectory_images > 0,
                progress=progress,
            )
        bar.update(n)
        yield Batch(start_index + offset, out, batch_labels)
    bar.close()
