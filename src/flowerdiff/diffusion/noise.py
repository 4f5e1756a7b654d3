"""Seeded noise: one CPU generator per image, so image ``i`` of seed ``s`` is the same anywhere.

Every random draw of sampling (the starting noise and the fresh noise of stochastic steps) comes
from these generators, so the same seed gives the same images whatever the batch split, the
number of ranks or the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def make_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """CPU generators for global image indices ``start .. start + count - 1``.

    Image ``i`` gets a generator seeded from ``(seed, i)`` through numpy's SeedSequence (a hash, so
    nearby seeds/indices give unrelated streams); rank ``r`` making images ``start..start+count``
    therefore reproduces its slice of the unsharded set exactly.
    """
    if seed < 0 or start < 0 or count < 0:
        raise ValueError(
            f"make_generators(seed={seed}, start={start}, count={count}): all three must be "
            "non-negative integers (seed: base seed, start: global index of the first image, "
            "count: number of images)."
        )
    generators = []
    for index in range(start, start + count):
        state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
        generators.append(torch.Generator(device="cpu").manual_seed(int(state)))
    return generators


def randn_per_image(
    shape: Sequence[int],
    generators: Sequence[torch.Generator] | None,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal tensor of the full batch ``shape`` = [B, ...].

    With ``generators`` (length B, CPU), image ``b`` is drawn in float32 from ``generators[b]``
    alone and then moved/cast, so its values do not depend on B, the device or ``dtype``.
    ``None`` draws from the global RNG directly on ``device``.
    """
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(
            f"randn_per_image got {len(generators)} generators for a batch of {shape[0]} "
            "images; pass exactly one generator per image (see make_generators) or None."
        )
    per_image = [torch.randn(shape[1:], generator=g, device=g.device) for g in generators]
    return torch.stack(per_image).to(device=device, dtype=dtype)
