"""FID/KID from features, and the real-data reference features cached on disk.

The feature extractor runs once per image, outside the metrics: torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` get an identity "network" and only hold
the statistics, whose states torchmetrics reduces across ranks in ``compute()``. The extractor
always runs in float32 (autocast off): FID is sensitive to feature precision.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from flowerdiff.data.cache import cache_key
from flowerdiff.files import atomic_torch_save
from flowerdiff.metrics.features import extractor_fingerprint

log = logging.getLogger(__name__)

REFERENCE_VERSION = 1
# Images per piece of a reference that several processes compute together (a multiple of the
# extractor's CPU micro-batch; 29 pieces for the 7,370 flowers).
REFERENCE_PIECE = 256


class Features(nn.Module):
    """The metrics' "network": features are extracted beforehand, so it passes them through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: Tensor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Features of uint8 ``images`` ``[N, 3, H, W]`` (any device) as float32 on the CPU."""
    out = []
    device = torch.device(device)
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc="Inception features", disable=not progress, leave=False):
        batch = images[start : start + batch_size].to(device)
        with torch.autocast(device.type, enabled=False):
            out.append(extractor(batch).float().cpu())
    return torch.cat(out) if out else torch.empty(0, getattr(extractor, "num_features", 0))


class SampleQuality(nn.Module):
    """FID (and optionally KID) of generated features against fixed real features.

    ``sync``: reduce the states over all ranks in ``compute()`` (training); ``False`` scores this
    process's features alone even when torch.distributed is initialised.
    """

    def __init__(
        self,
        num_features: int,
        kid: bool = False,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        sync: bool = True,
    ) -> None:
        super().__init__()
        identity = Features(num_features)
        self.fid = FrechetInceptionDistance(
            feature=identity, reset_real_features=False, sync_on_compute=sync
        )
        self.kid: KernelInceptionDistance | None = None
        if kid:
            with warnings.catch_warnings():  # "KID keeps every feature in memory": intended
                warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance`")
                self.kid = KernelInceptionDistance(
                    feature=identity,
                    subsets=kid_subsets,
                    subset_size=kid_subset_size,
                    reset_real_features=False,
                    sync_on_compute=sync,
                )
        self.kid_subset_size = kid_subset_size
        self.sync = sync

    def update(self, features: Tensor, real: bool) -> None:
        features = features.to(self.fid.device, torch.float32)
        self.fid.update(features, real=real)
        if self.kid is not None:
            self.kid.update(features, real=real)

    def compute(self) -> dict[str, float]:
        """``fid`` (and ``kid_mean``/``kid_std``); a collective under DDP: call on every rank."""
        result = {"fid": float(self.fid.compute())}
        if self.kid is not None:
            # KID draws subsets without replacement: never larger than the smaller set.
            fake = int(self.fid.fake_features_num_samples)
            real = int(self.fid.real_features_num_samples)
            if (
                self.sync
                and torch.distributed.is_available()
                and torch.distributed.is_initialized()
            ):
                counts = torch.tensor([fake, real], device=self.fid.device)
                torch.distributed.all_reduce(counts)
                fake, real = counts.tolist()
            self.kid.subset_size = min(self.kid_subset_size, fake, real)
            mean, std = self.kid.compute()
            result.update(kid_mean=float(mean), kid_std=float(std))
        return result

    def reset_fake(self) -> None:
        """Forget the generated features; the real ones stay (``reset_real_features=False``)."""
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()


def reference_key(data_key: str, extractor: nn.Module) -> str:
    """Cache key: the data set's identity (files, sizes, mtimes, resolution) and the extractor."""
    text = f"v{REFERENCE_VERSION}|{data_key}|{extractor_fingerprint(extractor)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_path(cache_dir: str | Path, data_key: str, extractor: nn.Module) -> Path:
    return Path(cache_dir).expanduser() / f"fid-reference-{reference_key(data_key, extractor)}.pt"


def piece_path(work_dir: Path, data_key: str, extractor: nn.Module, index: int) -> Path:
    """Where a helper leaves the features of reference piece ``index`` (keyed like the cache)."""
    return work_dir / reference_key(data_key, extractor) / f"piece_{index}.pt"


def load_piece(path: Path, images: int, columns: int | None) -> Tensor | None:
    """A helper's features of one piece, if the file holds what one would have written: a dense,
    finite float32 tensor with a row per image; else None (the piece is then computed again)."""
    if not path.is_file():
        return None
    try:
        piece = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the caller recomputes the piece
        log.warning("Ignoring %s: not a tensor file", path)
        return None
    if (
        type(piece) is Tensor
        and piece.layout == torch.strided
        and piece.dtype == torch.float32
        and piece.dim() == 2
        and len(piece) == images
        and piece.shape[1] == (columns or piece.shape[1])
        and bool(piece.isfinite().all())
    ):
        return piece
    log.warning("Ignoring %s: not the features of %d images", path, images)
    return None


def reference_features(
    images: Callable[[], Tensor],
    data_key: str,
    extractor: nn.Module,
    cache_dir: str | Path | None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    work_dir: Path | None = None,
) -> tuple[Tensor, bool]:
    """Real-image features ``[N, D]`` from ``cache_dir`` or computed (and saved) now.

    ``images`` is only called on a cache miss. Returns the features and whether they came from
    the cache. Features rather than mean/covariance are stored, so KID can use them too.
    ``work_dir``: pieces that other processes computed there (:func:`help_with_reference`) are
    taken once checked; only the others are computed here. The caller owns (and removes) it.
    """
    path = None if cache_dir is None else reference_path(cache_dir, data_key, extractor)
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return cached["features"], True
    real = images()
    log.info("Computing FID reference features of %d real images (once; cached)", len(real))
    if work_dir is None:
        features = extract_features(extractor, real, batch_size, device, progress)
    else:
        parts = []
        for index, chunk in enumerate(real.split(REFERENCE_PIECE)):
            done = piece_path(work_dir, data_key, extractor, index)
            piece = load_piece(done, len(chunk), getattr(extractor, "num_features", None))
            # Spot check: the first image's features, recomputed here, must be the stored ones.
            if piece is not None and not torch.allclose(
                extract_features(extractor, chunk[:1], 1, device), piece[:1], rtol=1e-3, atol=1e-3
            ):
                log.warning("Ignoring %s: its first row is not that image's features", done)
                piece = None
            if piece is None:
                piece = extract_features(extractor, chunk, batch_size, device, progress)
            parts.append(piece)
        features = torch.cat(parts)
    if path is not None:
        meta = {"data_key": data_key, "extractor": extractor_fingerprint(extractor)}
        atomic_torch_save({"features": features, "meta": meta}, path)
    return features, False


def help_with_reference(
    images: Callable[[], Tensor],
    data_key: str,
    extractor: nn.Module,
    cache_dir: str | Path | None,
    work_dir: Path,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> int:
    """Compute the reference pieces no other process has claimed, each saved in ``work_dir``;
    the number computed. For processes that finish their own work early (the race's sides,
    where two one-thread processes extracted 9.1 images/s against 8 for one with two threads).
    Nothing to do when the reference is cached."""
    if cache_dir is not None and reference_path(cache_dir, data_key, extractor).is_file():
        return 0
    real = images()
    computed = 0
    piece_path(work_dir, data_key, extractor, 0).parent.mkdir(parents=True, exist_ok=True)
    for index, chunk in enumerate(real.split(REFERENCE_PIECE)):
        done = piece_path(work_dir, data_key, extractor, index)
        try:  # the claim: whoever creates this file first computes the piece
            os.close(os.open(done.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        atomic_torch_save(extract_features(extractor, chunk, batch_size, device), done)
        computed += 1
    return computed


def datamodule_data_key(datamodule: object) -> str:
    """The identity of a FlowersDataModule's images for the reference cache."""
    return f"{datamodule.source_name}|{cache_key(datamodule.image_files(), datamodule.image_size)}"


def datamodule_images(datamodule: object) -> Callable[[], Tensor]:
    """Every image of the source, the validation hold-out included: FID's reference is the
    data distribution, and the split seed must not change the score. The set the data module
    already decoded for training (setup), else decoded (or read from its cache) when called."""

    def images() -> Tensor:
        decoded = getattr(datamodule, "images", None)
        return decoded if decoded is not None else datamodule.load_images()

    return images


def datamodule_reference(
    datamodule: object, extractor: nn.Module, cache_dir: str | Path | None, **options: Any
) -> tuple[Tensor, bool]:
    """Reference features of every image of a FlowersDataModule (its decoded uint8 tensor);
    ``options`` as :func:`reference_features`'s."""
    return reference_features(
        datamodule_images(datamodule),
        datamodule_data_key(datamodule),
        extractor,
        cache_dir,
        **options,
    )


def _kth_neighbour_radii(features: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of each feature to its k-th nearest neighbour in the same set (self excluded)."""
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        # the k+1 smallest include the point itself at distance 0
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def _coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk: int) -> float:
    """Share of ``queries`` inside at least one ball (support_i, radius_i)."""
    inside = 0
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start : start + chunk], support)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / max(len(queries), 1)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) on feature vectors.

    Each set's manifold is the union of balls around its points with radius the distance to
    the k-th nearest neighbour; precision is the share of generated samples inside the real
    manifold (fidelity), recall the share of real samples inside the generated one (diversity,
    what strong guidance loses). Computed in float64 on the CPU, in chunks.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} real and generated images; got "
            f"{len(real)} and {len(fake)}."
        )
    real, fake = real.double().cpu(), fake.double().cpu()
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    return {
        "precision": _coverage(fake, real, real_radii, chunk),
        "recall": _coverage(real, fake, fake_radii, chunk),
    }
