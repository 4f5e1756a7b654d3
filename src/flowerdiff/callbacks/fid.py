"""FIDCallback: FID of generated samples during training, sharded over every rank.

Each rank generates its contiguous share of the ``num_samples`` seeded images (image ``i`` is
the same whatever the number of ranks, see :func:`~flowerdiff.training.generate.sample_batches`),
extracts Inception features in float32 and adds them to a torchmetrics
``FrechetInceptionDistance`` whose states are summed across ranks in ``compute()`` — which
therefore runs on every rank. Class-conditional models are scored on class-balanced samples
(image ``i`` has class ``i mod num_classes``) with the configured guidance.

Guidance trade-off (``guidance_scales``): the same seeded images are drawn once per scale, each
scored on its own, and the scores are logged per scale together with a plot of FID, precision
and recall against the scale (``samples/guidance_tradeoff``). Precision and recall
(Kynkäänniemi et al. 2019) need every generated feature in one place: each rank's share is
gathered (a collective, on every rank), rank zero scores them against all real features and
broadcasts the result, so every rank logs the same numbers.

The real-data reference statistics are computed (or read from the cache) when the first
evaluation needs them, with a progress bar, not before the first training step: a run that
never reaches an evaluation never pays for them. Only the Inception weights are checked at
start-up, since a missing file must stop the run before it trains.

EMA: the work runs while the EMA weights are swapped in, whatever the callback order (see
:class:`~flowerdiff.callbacks.sampling.ValidationSamplingCallback`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from flowerdiff.callbacks.sampling import ValidationSamplingCallback
from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.metrics.features import to_uint8
from flowerdiff.metrics.quality import (
    SampleQuality,
    datamodule_reference,
    extract_features,
    precision_recall,
)
from flowerdiff.training.generate import balanced_labels, sample_batches, shard
from flowerdiff.viz.dashboard import image_path, log_image
from flowerdiff.viz.figures import plot_tradeoff

log = logging.getLogger(__name__)


TRADEOFF_KEY = "samples/guidance_tradeoff"


def scale_key(metric: str, scale: float) -> str:
    """``val/<metric>_w<scale>``: ``val/fid_w2``, ``val/recall_w1.5``."""
    return f"val/{metric}_w{scale:g}"


class FIDCallback(ValidationSamplingCallback):
    """Log ``val/fid`` (and ``val/fid_best``, optionally ``val/kid``, ``val/precision`` and
    ``val/recall``) every few validations; with ``guidance_scales``, also each scale's
    ``val/fid_w<scale>`` (``val/precision_w<scale>``, ``val/recall_w<scale>``) and the
    trade-off plot. The unsuffixed keys are always the primary scale's.

    Args:
        feature_extractor: uint8 ``[N, 3, H, W]`` -> ``[N, D]`` module with ``num_features``
            (``flowerdiff.metrics.features.build_inception`` for the real FID).
        num_samples: generated images per evaluation, over all ranks together.
        batch_size: images per sampling/feature batch on each rank.
        every_n_epochs: evaluate at validations of epochs ``n-1, 2n-1, ...`` (None: never by epoch).
        every_n_steps: also evaluate at the first validation ``n`` or more steps after the last.
        sampler: a sampler config for generation (None: the run's ``sampler``).
        num_inference_steps: override the sampler's number of steps.
        seed: base seed; the same images are drawn at every evaluation, so scores compare.
        kid: also log ``val/kid`` (needs all features in memory; FID does not).
        cache_dir: folder for the real-data reference features (None: recompute every run).
        reference_batch_size: images per batch when computing the reference features.
        guidance_scale: classifier-free guidance for class-conditional models; with
            ``guidance_scales``, the primary scale (``val/fid``, ``val/fid_best``) when it is
            one of them, else the first of them is.
        guidance_scales: scales to evaluate at every evaluation (class-conditional models), e.g.
            ``[1, 2, 3]``; None or empty: ``guidance_scale`` alone. Each scale costs a full
            ``num_samples`` of sampling.
        precision_recall: also log precision and recall (k-NN manifolds of the features,
            ``pr_k`` neighbours). Needs every generated feature: gathered to rank zero, which
            scores them against all real ones (its cost grows with the square of the numbers).
        pr_k: the k of precision and recall (3, as Kynkäänniemi et al.).
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        num_samples: int = 10_000,
        batch_size: int = 250,
        every_n_epochs: int | None = 10,
        every_n_steps: int | None = None,
        sampler: Mapping[str, Any] | None = None,
        num_inference_steps: int | None = None,
        seed: int = 0,
        kid: bool = False,
        cache_dir: str | None = None,
        reference_batch_size: int = 250,
        guidance_scale: float = 1.0,
        guidance_scales: Sequence[float] | None = None,
        precision_recall: bool = False,
        pr_k: int = 3,
    ) -> None:
        super().__init__(sampler, num_inference_steps)
        if num_samples < 2:
            raise ValueError(
                f"callbacks.fid.num_samples={num_samples}: FID needs at least 2 generated images "
                "(a covariance); 10000 is the usual figure, a few thousand for monitoring."
            )
        if precision_recall and (
            isinstance(pr_k, bool) or not isinstance(pr_k, int) or not 1 <= pr_k < num_samples
        ):
            raise ValueError(
                f"callbacks.fid.pr_k={pr_k!r} must be an integer >= 1 and below "
                f"callbacks.fid.num_samples={num_samples}: precision and recall measure each "
                "set's manifold by the distance to its pr_k-th nearest neighbour (3 is usual)."
            )
        self.guidances = self.scales_to_guidances(guidance_scale, guidance_scales)
        primary = Guidance(guidance_scale)
        self.guidance = primary if primary in self.guidances else self.guidances[0]
        self.extractor = feature_extractor.eval().requires_grad_(False)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.kid = kid
        self.cache_dir = cache_dir
        self.reference_batch_size = reference_batch_size
        self.precision_recall = bool(precision_recall)
        self.pr_k = pr_k
        self.quality: SampleQuality | None = None
        self.real: Tensor | None = None  # all real features, on rank zero, for precision/recall
        self.num_features = 0
        self.best = float("inf")
        self.last_step = -1
        self.timings: dict[str, float] = {}

    @staticmethod
    def scales_to_guidances(
        guidance_scale: float, guidance_scales: Sequence[float] | None
    ) -> list[Guidance]:
        """The Guidance of every scale to evaluate (checked now, not mid-training)."""
        scales = list(guidance_scales) if guidance_scales else [guidance_scale]
        guidances = []
        for scale in scales:
            try:
                guidances.append(Guidance(scale))
            except ValueError as error:
                raise ValueError(
                    f"callbacks.fid.guidance_scales={scales}: {error} Give null, or a list of "
                    "scales >= 0 such as [1, 2, 3]."
                ) from error
        if len(set(guidances)) < len(guidances):
            raise ValueError(
                f"callbacks.fid.guidance_scales={scales} repeats a scale; give each once."
            )
        return guidances

    # -- set-up: the reference statistics, when the first evaluation needs them -----------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "load_images"):
            raise ValueError(
                "FIDCallback needs the FlowersDataModule (trainer.fit(..., datamodule=...)) to "
                "compute the real-data reference statistics."
            )

    def reference(self, trainer: L.Trainer) -> SampleQuality:
        """The metric with the real features in (computed once per fit, cached on disk)."""
        if self.quality is not None:
            return self.quality
        device = trainer.strategy.root_device
        self.extractor.to(device)
        start = time.perf_counter()
        datamodule = trainer.datamodule
        # One process per node fills the cache (atomic writes: a shared cache is safe), the
        # others then read it. Without a cache every rank computes them once, itself.
        if self.cache_dir is not None and trainer.local_rank == 0:
            datamodule_reference(
                datamodule,
                self.extractor,
                self.cache_dir,
                batch_size=self.reference_batch_size,
                device=device,
                progress=trainer.is_global_zero,
            )
        trainer.strategy.barrier("fid_reference")
        real, _ = datamodule_reference(
            datamodule,
            self.extractor,
            self.cache_dir,
            batch_size=self.reference_batch_size,
            device=device,
            progress=self.cache_dir is None and trainer.is_global_zero,
        )
        self.timings["reference"] = time.perf_counter() - start
        self.num_features = real.shape[1]
        if self.precision_recall and len(real) <= self.pr_k:  # on every rank: no rank waits
            raise ValueError(
                f"callbacks.fid.precision_recall needs more than pr_k={self.pr_k} real images; "
                f"the data set has {len(real)}. Lower callbacks.fid.pr_k or add images."
            )
        if self.precision_recall and trainer.is_global_zero:
            self.real = real
        self.quality = SampleQuality(real.shape[1], kid=self.kid).to(device)
        # Each rank holds a disjoint share of the real features; the reduction sums them.
        self.quality.update(real[trainer.global_rank :: trainer.world_size], real=True)
        return self.quality

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
        """Score every guidance scale, log, plot. Runs on every rank (collectives inside)."""
        quality = self.reference(trainer)
        start_index, count = shard(self.num_samples, trainer.global_rank, trainer.world_size)
        labels = None
        if pl_module.num_classes is not None:
            labels = balanced_labels(self.num_samples, pl_module.num_classes)
            labels = labels[start_index : start_index + count]
        # An unconditional model has no guidance: one evaluation, whatever the scales.
        guidances = self.guidances if labels is not None else [self.guidance]
        self.timings.update(sampling=0.0, features=0.0, statistics=0.0, precision_recall=0.0)
        runs = []
        for guidance in guidances:
            scores = self.score(trainer, pl_module, quality, start_index, count, labels, guidance)
            runs.append({"guidance_scale": guidance.scale, **scores})
        primary = runs[guidances.index(self.guidance) if self.guidance in guidances else 0]
        self.best = min(self.best, primary["fid"])
        self.last_step = trainer.global_step
        # Every rank holds the same values; sync_dist averages identical numbers.
        for name in ("fid", "kid_mean", "precision", "recall"):
            if name in primary:
                key = "val/kid" if name == "kid_mean" else f"val/{name}"
                pl_module.log(key, primary[name], on_epoch=True, sync_dist=True)
        pl_module.log("val/fid_best", self.best, on_epoch=True, sync_dist=True)
        if len(runs) > 1:
            for run in runs:
                for name in ("fid", "precision", "recall"):
                    if name in run:
                        key = scale_key(name, run["guidance_scale"])
                        pl_module.log(key, run[name], on_epoch=True, sync_dist=True)
            if trainer.is_global_zero:
                self.log_tradeoff(trainer, runs)
        log.info(
            "FID %s (%d samples) timings %s",
            ", ".join(f"{run['fid']:.3f} at w={run['guidance_scale']:g}" for run in runs),
            self.num_samples,
            self.timings,
        )
        return primary

    def score(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        quality: SampleQuality,
        start_index: int,
        count: int,
        labels: Tensor | None,
        guidance: Guidance,
    ) -> dict[str, float]:
        """Generate this rank's share with ``guidance``, add its features, reduce (and
        precision/recall on rank zero, broadcast)."""
        batches = sample_batches(
            pl_module,
            count,
            seed=self.seed,
            start_index=start_index,
            batch_size=self.batch_size,
            sampler=self.sampler_for(pl_module),
            labels=labels,
            guidance=guidance if labels is not None else None,
            autocast=trainer.precision_plugin.forward_context,
        )
        fake: list[Tensor] = []
        tic = time.perf_counter()
        for batch in batches:  # sampling happens as the loop asks for the next batch
            toc = time.perf_counter()
            self.timings["sampling"] += toc - tic
            images = to_uint8(batch.output.images)
            features = extract_features(self.extractor, images, len(images), pl_module.device)
            quality.update(features, False)
            if self.precision_recall:
                fake.append(features)
            tic = time.perf_counter()
            self.timings["features"] += tic - toc
        scores = quality.compute()  # collective: every rank, never under a rank-zero guard
        quality.reset_fake()
        toc = time.perf_counter()
        self.timings["statistics"] += toc - tic
        if self.precision_recall:
            mine = torch.cat(fake) if fake else torch.empty(0, self.num_features)
            everything = gather_features(trainer, mine, self.num_samples)  # collective
            result = None
            if trainer.is_global_zero:
                assert self.real is not None
                result = precision_recall(self.real, everything, k=self.pr_k)
            scores.update(trainer.strategy.broadcast(result, src=0))  # collective
            self.timings["precision_recall"] += time.perf_counter() - toc
        return scores

    def log_tradeoff(self, trainer: L.Trainer, runs: list[dict[str, float]]) -> None:
        """The trade-off plot (FID, precision, recall per scale) to the dashboard; rank zero."""
        path = plot_tradeoff(runs, image_path(trainer, TRADEOFF_KEY, trainer.global_step))
        caption = "; ".join(
            f"w={run['guidance_scale']:g}: FID {run['fid']:.2f}"
            + "".join(f", {k} {run[k]:.2f}" for k in ("precision", "recall") if k in run)
            for run in runs
        )
        log_image(trainer, TRADEOFF_KEY, path, caption=caption)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.best = float(state_dict["best"])
        self.last_step = int(state_dict["last_step"])


def gather_features(trainer: L.Trainer, features: Tensor, total: int) -> Tensor:
    """Every rank's share of the ``total`` generated features, in image order, on every rank
    (the shares of :func:`~flowerdiff.training.generate.shard` may differ by one, so each is
    padded to the largest for the all-gather and trimmed after). A collective."""
    world = trainer.world_size
    if world == 1:
        return features
    counts = [shard(total, rank, world)[1] for rank in range(world)]
    padded = features.new_zeros(max(counts), features.shape[1])
    padded[: len(features)] = features
    gathered = trainer.strategy.all_gather(padded.to(trainer.strategy.root_device)).cpu()
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])
