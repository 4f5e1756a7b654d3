"""FlowersDataModule: images in [-1, 1] (and labels) from a registered source, decoded once."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from flowerdiff.data.cache import load_or_build
from flowerdiff.data.sampler import ResumableRandomSampler
from flowerdiff.data.sources import SOURCES, DataSourceError, ImageSource, read_class_names

log = logging.getLogger(__name__)


class IndexedImages(Dataset):
    """uint8 images, their index in the whole set (it seeds fixed validation noise) and, with
    labels, their class."""

    def __init__(
        self, images: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        self.images = images
        self.indices = indices
        self.labels = labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, ...]:
        index = self.indices[item]
        if self.labels is None:
            return self.images[index], index
        return self.images[index], index, self.labels[index]


class FlowersDataModule(L.LightningDataModule):
    """Decodes every image once into a cached uint8 tensor; scaling and flips run on the device.

    Args:
        source: a registered source (``folder``, ``flowers102``).
        root: where the source finds its files.
        image_size: images are resized (short side) and center-cropped to this.
        batch_size: the global batch per forward pass, split evenly over all processes, so the
            effective batch of one optimizer step is ``batch_size * accumulate_grad_batches``
            whatever the number of devices.
        val_fraction: deterministic hold-out for the validation loss (0 disables validation).
        labels: yield ``(image, index, label)`` batches for class-conditional training.
        class_names: a text file with one class name per line (grids and logs), or None.
        max_images: use only the first N files (None: all).
    """

    def __init__(
        self,
        source: str = "folder",
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
        labels: bool = False,
        class_names: str | None = None,
    ) -> None:
        super().__init__()
        self.source: ImageSource = SOURCES.get(source)(root=root, download=download)
        self.source_name = source
        if not _is_int(image_size) or image_size < 1:
            raise ValueError(f"`data.image_size={image_size!r}` must be a positive integer.")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(
                f"`data.batch_size={batch_size!r}` must be a positive integer (the global batch)."
            )
        if not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"`data.val_fraction={val_fraction!r}` must be in [0, 1): it is the share of "
                "images held out for the validation loss (0 disables validation)."
            )
        if max_images is not None and (not _is_int(max_images) or max_images < 1):
            raise ValueError(
                f"`data.max_images={max_images!r}` must be null (every image) or an integer "
                ">= 1 (use only the first N files)."
            )
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"`data.num_workers={num_workers!r}` must be an integer >= 0.")
        self.root = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
        self.random_flip = random_flip
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.cache_dir = cache_dir
        self.max_images = max_images
        self.use_labels = bool(labels)
        self.class_names_file = class_names
        self.num_classes: int | None = None  # what the network expects (see check)
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.train_set: IndexedImages | None = None
        self.val_set: IndexedImages | None = None

    # -- files and labels -------------------------------------------------------------------
    def image_files(self) -> list[Path]:
        files = self.source.files()
        return files[: self.max_images] if self.max_images else files

    def file_labels(self, files: list[Path] | None = None) -> list[int]:
        """One label per file, checked by the source against the network's ``num_classes``
        (errors name the file and the line)."""
        files = files if files is not None else self.image_files()
        return self.source.labels(files, self.num_classes)

    def class_names(self) -> list[str] | None:
        return read_class_names(self.class_names_file) if self.class_names_file else None

    def check(self, num_classes: int | None) -> None:
        """Before any decoding: labels and network agree, a folder holds images and, with
        labels, every file has one that fits the network's ``num_classes``. A download source
        is checked when it downloads."""
        self.num_classes = num_classes
        if self.use_labels and num_classes is None:
            raise DataSourceError(
                "data.labels=true, but the network is unconditional (model.net.num_classes="
                "null). Set model.net.num_classes to the number of classes in the data, or "
                "data.labels=false."
            )
        if not self.use_labels and num_classes is not None:
            raise DataSourceError(
                f"model.net.num_classes={num_classes}, but data.labels=false: a conditional "
                "network needs a label per image. Set data.labels=true (labels from labels.csv "
                "or class sub-folders, or torchvision's for data=flowers102), or "
                "model.net.num_classes=null."
            )
        self.check_class_names()
        if self.source.lists_cheaply:
            files = self.image_files()
            if self.use_labels:
                self.file_labels(files)

    def check_class_names(self) -> None:
        names = self.class_names()
        if names is not None and self.num_classes is not None and len(names) != self.num_classes:
            raise DataSourceError(
                f"data.class_names={self.class_names_file!r} lists {len(names)} names for "
                f"model.net.num_classes={self.num_classes} classes; give one name per class "
                "(one per line, in class-index order)."
            )

    def load_images(self) -> torch.Tensor:
        """The whole decoded set (cached on disk); corrupt files are skipped with one warning."""
        files = self.image_files()
        images, bad = load_or_build(files, self.image_size, self.cache_dir)
        if bad:
            shown = "\n  ".join(str(p) for p in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            rank_zero_warn(
                f"Skipped {len(bad)} of {len(files)} files under {self.root} that are not readable "
                f"images (corrupt, truncated or not an image):\n  {shown}{more}"
            )
        if len(images) == 0:
            raise DataSourceError(
                f"None of the {len(files)} files under data.root={self.root!r} could be decoded "
                "as an image. Point data.root at a folder of JPEG/PNG images."
            )
        if self.use_labels:
            skipped = set(bad)
            labels = self.file_labels([path for path in files if path not in skipped])
            self.labels = torch.tensor(labels, dtype=torch.long)
        return images

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs on one process per node: download and decode once, filling the disk cache.
        Without a cache there is nothing to fill: only the download happens here, and the
        images are decoded once, in :meth:`setup`."""
        if self.cache_dir is None:
            self.source.files()
            return
        self.load_images()

    def setup(self, stage: str | None = None) -> None:
        if self.images is not None:
            return
        self.images = self.load_images()
        count = len(self.images)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.split_seed))
        num_val = round(count * self.val_fraction)
        if self.val_fraction > 0 and num_val == 0 and count > 1:
            num_val = 1
        if count - num_val < 1:
            raise DataSourceError(
                f"Only {count} image(s) under data.root={self.root!r}: nothing is left to train "
                f"on after holding out data.val_fraction={self.val_fraction}."
            )
        self.val_set = IndexedImages(self.images, order[:num_val].sort().values, self.labels)
        self.train_set = IndexedImages(self.images, order[num_val:].sort().values, self.labels)

    def per_device_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world_size:
            raise DataSourceError(
                f"data.batch_size={self.batch_size} cannot be split evenly over {world_size} "
                "processes (trainer.devices x trainer.num_nodes). data.batch_size is the global "
                f"batch; use a multiple of {world_size}."
            )
        return self.batch_size // world_size

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size(),
            sampler=ResumableRandomSampler(dataset) if shuffle else None,
            # the training loader's base seed must not come from the global RNG (the sampler
            # draws it there instead, see flowerdiff.data.sampler)
            generator=torch.Generator() if shuffle else None,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
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

    def on_after_batch_transfer(
        self, batch: tuple[torch.Tensor, ...], dataloader_idx: int
    ) -> tuple[torch.Tensor, ...]:
        """uint8 -> float in [-1, 1] and random flips, on the device (no CPU work per batch)."""
        images, *rest = batch
        training = self.trainer is not None and self.trainer.training
        return (to_model_space(images, flip=self.random_flip and training), *rest)


def to_model_space(images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; ``flip``: each image mirrored with probability 1/2
    (the global torch RNG, so seeded runs repeat)."""
    images = images.float().div_(127.5).sub_(1.0)
    if flip:
        mirror = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
        images = torch.where(mirror, images.flip(-1), images)
    return images


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
