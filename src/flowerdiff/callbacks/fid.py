"""FIDCallback: FID of generated samples during training, sharded over every rank.

Each rank generates its contiguous share of the ``num_samples`` seeded images (image ``i`` is
the same whatever the number of ranks, see ``DiffusionModule.sample``), extracts Inception
features in float32 and adds them to a torchmetrics ``FrechetInceptionDistance`` whose states
are summed across ranks in ``compute()`` — which therefore runs on every rank.

EMA: the work runs while the EMA weights are swapped in, whatever the callback order (see
:class:`~flowerdiff.callbacks.sampling.ValidationSamplingCallback`).
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from torch import nn

from flowerdiff.callbacks.sampling import ValidationSamplingCallback
from flowerdiff.diffusion import Sampler
from flowerdiff.metrics.features import to_uint8
from flowerdiff.metrics.quality import SampleQuality, datamodule_reference, extract_features

log = logging.getLogger(__name__)


def shard(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of rank ``rank``'s contiguous share of ``total`` items."""
    base, extra = divmod(total, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


class FIDCallback(ValidationSamplingCallback):
    """Log ``val/fid`` (and ``val/fid_best``, optionally ``val/kid``) every few validations.

    Args:
        feature_extractor: uint8 ``[N, 3, H, W]`` -> ``[N, D]`` module with ``num_features``
            (``flowerdiff.metrics.features.build_inception`` for the real FID).
        num_samples: generated images per evaluation, over all ranks together.
        batch_size: images per sampling/feature batch on each rank.
        every_n_epochs: evaluate at validations of epochs ``n-1, 2n-1, ...`` (None: never by epoch).
        every_n_steps: also evaluate at the first validation ``n`` or more steps after the last.
        sampler: sampler for generation (None: the module's own, i.e. the ``sampler`` config).
        num_inference_steps: override the sampler's number of steps.
        seed: base seed; the same images are drawn at every evaluation, so scores compare.
        kid: also log ``val/kid`` (needs all features in memory; FID does not).
        cache_dir: folder for the real-data reference features (None: recompute every run).
        reference_batch_size: images per batch when computing the reference features.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        num_samples: int = 10_000,
        batch_size: int = 250,
        every_n_epochs: int | None = 10,
        every_n_steps: int | None = None,
        sampler: Sampler | None = None,
        num_inference_steps: int | None = None,
        seed: int = 0,
        kid: bool = False,
        cache_dir: str | None = None,
        reference_batch_size: int = 250,
    ) -> None:
        super().__init__(sampler, num_inference_steps)
        if num_samples < 2:
            raise ValueError(
                f"callbacks.fid.num_samples={num_samples}: FID needs at least 2 generated images "
                "(a covariance); 10000 is the usual figure, a few thousand for monitoring."
            )
        self.extractor = feature_extractor.eval().requires_grad_(False)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.kid = kid
        self.cache_dir = cache_dir
        self.reference_batch_size = reference_batch_size
        self.quality: SampleQuality | None = None
        self.best = float("inf")
        self.last_step = -1
        self.timings: dict[str, float] = {}

    # -- set-up: weights and reference statistics before the first training step --------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.quality is not None:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "load_images"):
            raise ValueError(
                "FIDCallback needs the FlowersDataModule (trainer.fit(..., datamodule=...)) to "
                "compute the real-data reference statistics."
            )
        device = trainer.strategy.root_device
        self.extractor.to(device)
        start = time.perf_counter()
        # One process per node fills the cache (atomic writes: a shared cache is safe), the
        # others then read it.
        if trainer.local_rank == 0:
            datamodule_reference(
                datamodule, self.extractor, self.cache_dir, self.reference_batch_size, device
            )
        trainer.strategy.barrier("fid_reference")
        real, _ = datamodule_reference(
            datamodule, self.extractor, self.cache_dir, self.reference_batch_size, device
        )
        self.timings["reference"] = time.perf_counter() - start
        self.quality = SampleQuality(real.shape[1], kid=self.kid).to(device)
        # Each rank holds a disjoint share of the real features; the reduction sums them.
        self.quality.update(real[trainer.global_rank :: trainer.world_size], real=True)

    # -- when ---------------------------------------------------------------------------------
    def should_run(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        by_epoch = (
            bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )
        by_step = bool(self.every_n_steps) and (
            self.last_step < 0 or trainer.global_step - self.last_step >= self.every_n_steps
        )
        return (by_epoch or by_step) and trainer.global_step != self.last_step

    # -- what ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate this rank's share, add its features, reduce, log. Runs on every rank."""
        assert self.quality is not None, "setup() computes the reference first"
        start_index, count = shard(self.num_samples, trainer.global_rank, trainer.world_size)
        sampler = self.sampler_for(pl_module)
        sampling = features = 0.0
        for offset in range(0, count, self.batch_size):
            n = min(self.batch_size, count - offset)
            tic = time.perf_counter()
            with trainer.precision_plugin.forward_context():
                out = pl_module.sample(
                    n, seed=self.seed, start_index=start_index + offset, sampler=sampler
                )
            images = to_uint8(out.images)
            toc = time.perf_counter()
            self.quality.update(
                extract_features(self.extractor, images, n, pl_module.device), False
            )
            sampling, features = sampling + toc - tic, features + time.perf_counter() - toc
        tic = time.perf_counter()
        scores = self.quality.compute()  # collective: every rank, never under a rank-zero guard
        self.quality.reset_fake()
        self.timings.update(
            sampling=sampling, features=features, statistics=time.perf_counter() - tic
        )
        self.best = min(self.best, scores["fid"])
        self.last_step = trainer.global_step
        # Every rank holds the same reduced value; sync_dist averages identical numbers.
        pl_module.log("val/fid", scores["fid"], on_epoch=True, sync_dist=True)
        pl_module.log("val/fid_best", self.best, on_epoch=True, sync_dist=True)
        if "kid_mean" in scores:
            pl_module.log("val/kid", scores["kid_mean"], on_epoch=True, sync_dist=True)
        log.info("FID %.3f (%d samples) timings %s", scores["fid"], self.num_samples, self.timings)
        return scores

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.best = float(state_dict["best"])
        self.last_step = int(state_dict["last_step"])
