"""Where images come from: a folder of files, or torchvision's Flowers102 download.

A source only lists files; decoding and resizing happen once in :mod:`flowerdiff.data.cache`.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class DataSourceError(RuntimeError):
    """The configured images cannot be found; raised before any training starts."""


def list_folder_images(root: str | Path) -> list[Path]:
    """Every image file under ``root``, flat or nested, in a stable (sorted) order."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataSourceError(
            f"data.root={str(root)!r} is not a directory. The 'folder' source reads every image "
            f"({', '.join(IMAGE_EXTENSIONS)}) below data.root, flat or in sub-folders. Point it at "
            "your images, e.g. `data=folder data.root=../shared/data/flowers102_64`, or use "
            "`data=flowers102` to download Oxford 102 Flowers."
        )
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise DataSourceError(
            f"data.root={str(root)!r} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)} "
            "in it and its sub-folders). Point data.root at a folder of images, e.g. "
            "`data=folder data.root=../shared/data/flowers102_64`."
        )
    return files


def list_flowers102_images(root: str | Path, download: bool = True) -> list[Path]:
    """All 8,189 Oxford 102 Flowers images (train + val + test, as the book trains on).

    Uses torchvision's ``Flowers102`` for the download and integrity check; the three splits
    share one ``jpg/`` folder, so listing the split files of each gives the whole set once.
    """
    from torchvision.datasets import Flowers102

    root = Path(root).expanduser()
    files: set[Path] = set()
    try:
        for split in ("train", "val", "test"):
            dataset = Flowers102(str(root), split=split, download=download)
            files.update(Path(f) for f in dataset._image_files)
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
        raise DataSourceError(
            f"Could not load Oxford 102 Flowers from data.root={str(root)!r} "
            f"(download={download}): {type(error).__name__}: {error}. torchvision's Flowers102 "
            "tried to find or download the archive from the Oxford VGG server into that folder. "
            "Without internet, copy the images elsewhere and train on them with "
            "`data=folder data.root=/path/to/images` (e.g. ../shared/data/flowers102_64)."
        ) from error
    return sorted(files)
