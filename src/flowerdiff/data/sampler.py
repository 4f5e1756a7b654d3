"""The training order: PyTorch's random sampler, made resumable in the middle of an epoch.

With a ``RandomSampler``, every epoch takes two numbers from the global RNG: the DataLoader
iterator's base seed, drawn whenever Lightning happens to create the iterator (on a resumed
run: before the RNG states are restored), and the sampler's shuffling seed. Here the training
DataLoader gets a private generator for its base seed, and this sampler draws both numbers
itself, in the same order, at the first batch of the epoch: seeded runs see exactly the numbers
they saw before, and a resumed run sees them after its states are restored. The sampler
remembers its seed, so a checkpoint written mid-epoch (preemption, Ctrl-C) can ask for the same
order again and skip the batches already trained on (:meth:`resume_with`). Lightning still
replaces it with its ``DistributedSampler`` in multi-process training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class ResumableRandomSampler(RandomSampler):
    """A fresh random order per pass; the seed of the current pass is :attr:`epoch_seed`."""

    def __init__(self, data_source: Sized) -> None:
        super().__init__(data_source)
        self.epoch_seed: int | None = None
        self._resume: tuple[int, int] | None = None  # (seed, indices to skip), next pass only

    def resume_with(self, seed: int, skip: int) -> None:
        """The next pass repeats the order of ``seed`` and starts after ``skip`` indices."""
        self._resume = (int(seed), int(skip))

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            seed, skip = self._resume
            self._resume = None
        else:  # what DataLoader (its base seed) and RandomSampler draw, in that order
            torch.empty((), dtype=torch.int64).random_()
            seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.epoch_seed = seed
        generator = torch.Generator().manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator)[skip:].tolist()
