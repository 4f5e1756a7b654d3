"""FlowersDataModule: images in [-1, 1] from a folder or Oxford 102 Flowers, decoded once."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from flowerdiff.data.cache import load_or_build
from flowerdiff.data.sources import DataSourceError, list_flowers102_images, list_folder_images

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (images, dataset indices)


class IndexedImages(Dataset):
    """uint8 images and their index in the whole set (the index seeds fixed validation noise)."""

    def __init__(self, images: torch.Tensor, indices: torch.Tensor) -> None:
        self.images = images
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Batch:
        index = self.indices[item]
        return self.images[index], index


class FlowersDataModule(L.LightningDataModule):
    """Decodes every image once into a cached uint8 tensor; scaling and flips run on the device.

    ``batch_size`` is the global batch per forward pass: it is split evenly over all processes,
    so the effective batch of one optimizer step is ``batch_size * accumulate_grad_batches``
    whatever the number of devices.
    """

    def __init__(
        self,
        source: Literal["folder", "flowers102"] = "folder",
        root: str = "data",
        image_size: int = 64,
        batch_size: int = 64,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        random_flip: bool = True,
        num_workers: int = 0,
        pin_memory: bool = True,
        download: bool = True,
        cache_dir: str | None = None,
        max_images: int | None = None,
    ) -> None:
        super().__init__()
        if source not in ("folder", "flowers102"):
            raise ValueError(
                f"data.source={source!r} is not a known data source. Use 'folder' (any directory "
                "of images, with data.root) or 'flowers102' (torchvision's Oxford 102 Flowers, "
                "downloaded into data.root)."
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction={val_fraction} must be in [0, 1): it is the share of images "
                "held out for the validation loss (0 disables validation)."
            )
        self.save_hyperparameters()
        self.images: torch.Tensor | None = None
        self.train_set: IndexedImages | None = None
        self.val_set: IndexedImages | None = None

    # -- files --------------------------------------------------------------------------
    def image_files(self) -> list[Path]:
        hp = self.hparams
        if hp.source == "folder":
            files = list_folder_images(hp.root)
        else:
            files = list_flowers102_images(hp.root, download=hp.download)
        return files[: hp.max_images] if hp.max_images else files

    def load_images(self) -> torch.Tensor:
        """The whole decoded set (cached on disk); corrupt files are skipped with one warning."""
        hp = self.hparams
        files = self.image_files()
        images, bad = load_or_build(files, hp.image_size, hp.cache_dir)
        if bad:
            shown = "\n  ".join(str(p) for p in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            rank_zero_warn(
                f"Skipped {len(bad)} of {len(files)} files under {hp.root} that are not readable "
                f"images (corrupt, truncated or not an image):\n  {shown}{more}"
            )
        if len(images) == 0:
            raise DataSourceError(
                f"None of the {len(files)} files under data.root={hp.root!r} could be decoded as "
                "an image. Point data.root at a folder of JPEG/PNG images."
            )
        return images

    # -- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs on one process per node: download and decode once, filling the disk cache."""
        self.load_images()

    def setup(self, stage: str | None = None) -> None:
        if self.images is not None:
            return
        self.images = self.load_images()
        count = len(self.images)
        order = torch.randperm(
            count, generator=torch.Generator().manual_seed(self.hparams.split_seed)
        )
        num_val = round(count * self.hparams.val_fraction)
        if self.hparams.val_fraction > 0 and num_val == 0 and count > 1:
            num_val = 1
        if count - num_val < 1:
            raise DataSourceError(
                f"Only {count} image(s) under data.root={self.hparams.root!r}: nothing is left to "
                f"train on after holding out data.val_fraction={self.hparams.val_fraction}."
            )
        self.val_set = IndexedImages(self.images, order[:num_val].sort().values)
        self.train_set = IndexedImages(self.images, order[num_val:].sort().values)

    def per_device_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={self.hparams.batch_size} cannot be split evenly over "
                f"{world_size} processes (trainer.devices x trainer.num_nodes). data.batch_size is "
                f"the global batch; use a multiple of {world_size}."
            )
        return self.hparams.batch_size // world_size

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size(),
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        if len(self.train_set) < self.per_device_batch_size():
            raise DataSourceError(
                f"The training split has {len(self.train_set)} images, fewer than one batch "
                f"({self.per_device_batch_size()} per device): lower data.batch_size or add images."
            )
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """uint8 -> float in [-1, 1] and random flips, on the device (no CPU work per batch)."""
        images, indices = batch
        images = images.float().div_(127.5).sub_(1.0)
        if self.hparams.random_flip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
            images = torch.where(flip, images.flip(-1), images)
        return images, indices
