"""Continuing a run: ``ckpt_path=last``, the state Lightning does not save, interrupts.

Lightning restores the model, optimizer, LR schedule, loop counters and callback state (EMA
included) from a checkpoint, but not the random number generators nor the position in the
epoch's data order. :class:`RNGState` puts both in every checkpoint, so that a resumed run is
bit-identical to one that never stopped. :class:`InterruptCheckpoint` writes a checkpoint when
training is interrupted (crash, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint

from flowerdiff.data.sampler import ResumableRandomSampler

log = logging.getLogger(__name__)


def numpy_state_to_plain(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """numpy's legacy MT19937 state with its key array as a tensor: checkpoints stay loadable
    with ``torch.load(weights_only=True)``, which refuses numpy arrays."""
    name, keys, *rest = state
    return (name, torch.from_numpy(keys.astype(np.int64)), *rest)


def numpy_state_from_plain(state: tuple[Any, ...]) -> tuple[Any, ...]:
    name, keys, *rest = state
    return (name, keys.numpy().astype(np.uint32), *rest)


def collect_rng_states() -> dict[str, Any]:
    """Torch CPU (and every CUDA device), numpy and python RNG states, as plain tensors/tuples."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states` (CUDA states only when the device count matches)."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(numpy_state_from_plain(states["numpy"]))
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_rngs(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python, but not ``PL_GLOBAL_SEED`` as Lightning's
    ``seed_everything`` would: the DistributedSampler reads that, and it must be one seed on
    every rank or the ranks' shards of an epoch would overlap."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState(Callback):
    """Save every RNG state and the position in the epoch; restore both on resume.

    Lightning restores the model, optimizer, LR schedule, loop counters and callback state, but
    neither the random number generators nor where in an epoch's data order a run stopped. The
    states are captured when a checkpoint is written and put back when training starts after a
    resume, the last moment before the next batch draws its flips, timesteps and noise
    (anything earlier would be undone by what Lightning's set-up draws in between). The
    epoch's shuffling seed is saved too: after a mid-epoch checkpoint (preemption, Ctrl-C) the
    :class:`~flowerdiff.data.sampler.ResumableRandomSampler` repeats that order and skips the
    batches already trained on, so a single-process run resumes bit-identically from any
    checkpoint.

    Multi-process training: Lightning's ``seed_everything`` gives every process the same seed,
    so rank ``r`` is re-seeded with ``seed + r`` to draw different timesteps and noise for its
    different images. Only rank 0 writes the checkpoint, so on resume ranks > 0 derive their
    streams from rank 0's saved state and their rank. Lightning's DistributedSampler orders each
    epoch by (seed, epoch), so there a mid-epoch resume repeats that epoch's first batches.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rank = 0
        self._pending: dict[str, Any] | None = None  # loaded, not yet put back
        self._position: dict[str, int | None] = {"seed": None, "batches": 0}

    @property
    def state_key(self) -> str:
        return "RNGState"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank
        if stage == "fit" and trainer.world_size > 1 and self.seed is not None:
            seed_rngs(self.seed + trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:  # saved again before training resumed: nothing moved
            return self._pending
        return {"rng": collect_rng_states(), **self._position}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._position = _position(trainer)  # Lightning saves after its other callbacks

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._position = _position(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning's set-up, before the first batch is drawn (also on a mid-epoch
        restart, which calls no epoch-start hook): put the saved states back."""
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        self._restore_rngs(state["rng"])
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        mid_epoch = 0 < state.get("batches", 0) < trainer.num_training_batches
        if (
            mid_epoch
            and isinstance(sampler, ResumableRandomSampler)
            and state.get("seed") is not None
        ):
            sampler.resume_with(state["seed"], state["batches"] * (loader.batch_size or 1))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def _restore_rngs(self, states: dict[str, Any]) -> None:
        set_rng_states(states)
        if self._rank > 0:
            saved = torch.Generator().set_state(states["torch"])  # a copy of rank 0's stream
            base = int(torch.randint(2**31, (1,), generator=saved))
            seed_rngs(base + self._rank)


def _position(trainer: L.Trainer) -> dict[str, int | None]:
    """The epoch's shuffling seed and the number of its batches trained so far."""
    sampler = getattr(trainer.train_dataloader, "sampler", None)
    return {
        "seed": getattr(sampler, "epoch_seed", None),
        "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
    }


class InterruptCheckpoint(Checkpoint):
    """A checkpoint written when training is interrupted, once it has taken a step.

    It catches SIGTERM preemption (Lightning turns it into an exception at the next batch), a
    crash or Ctrl-C. An error before the first step (a bad path, a bad config) writes nothing:
    there is nothing to resume, and the original error must stay the one the user sees.

    Not Lightning's ``OnExceptionCheckpoint``: with one of those in the trainer, Lightning turns
    ``fit(ckpt_path=None)`` into ``"last"`` and silently resumes whatever ``last.ckpt`` the
    checkpoint folder holds (e.g. a re-run multirun job). Here ``ckpt_path=null`` means a fresh
    start and ``ckpt_path=last`` resumes (:func:`resolve_ckpt_path`).
    """

    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        self.ckpt_path = os.path.join(dirpath, f"{filename}.ckpt")

    def on_exception(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == 0:
            return
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as error:  # never mask the exception that stopped training
            log.warning("Could not write the on-exception checkpoint %s: %s", self.ckpt_path, error)

    def teardown(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """Lightning calls callback teardown only when fit ends normally: then last.ckpt is
        newer and the interrupt checkpoint is stale."""
        trainer.strategy.remove_checkpoint(self.ckpt_path)


def resolve_ckpt_path(ckpt_path: str | None, trainer: L.Trainer) -> str | None:
    """``last`` -> the newest resumable checkpoint of *this* run directory, or ``None``.

    Candidates are ``last.ckpt`` of every ModelCheckpoint, the on-exception checkpoint (written on
    a crash, Ctrl-C or SIGTERM preemption) and Lightning's SLURM ``hpc_ckpt_*.ckpt`` (written on
    the requeue signal). With none of them the run starts from scratch, so the same command
    works for the first launch of a job and for every requeue. Any other value must be a file.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) != "last":
        if not Path(ckpt_path).expanduser().is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path!r} does not exist. Pass the path of a .ckpt file, or "
                "ckpt_path=last to continue the run in hydra.run.dir (for a previous run: "
                "hydra.run.dir=<that run's directory> ckpt_path=last)."
            )
        return str(ckpt_path)
    candidates = list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            candidates.append(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}.ckpt")
        elif isinstance(callback, InterruptCheckpoint):
            candidates.append(Path(callback.ckpt_path))
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        log.info(
            "ckpt_path=last: no checkpoint in %s yet, starting from scratch.",
            trainer.default_root_dir,
        )
        return None
    newest = max(existing, key=lambda path: path.stat().st_mtime)
    log.info("ckpt_path=last: resuming from %s", newest)
    return str(newest)
