"""Where images (and their labels) come from: a folder of files, or torchvision's Flowers102.

A source lists files and, for class-conditional training, one label per file; decoding and
resizing happen once in :mod:`flowerdiff.data.cache`. Sources are registered by name
(``data.source``): a new one is a class with ``files()`` and ``labels(files)``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from flowerdiff.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
LABELS_CSV = "labels.csv"
# Class-name lists that ship with the package, by the name data.class_names may give.
BUILTIN_CLASS_NAMES = {"oxford102": Path(__file__).with_name("oxford102_classes.txt")}


class DataSourceError(RuntimeError):
    """The configured images or labels cannot be used; raised before any training starts."""


class ImageSource:
    """Base class: the files of a data set and, when asked, their labels."""

    lists_cheaply = True  # files() reads a local folder (False: it may download)

    def __init__(self, root: str | Path, download: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.download = download

    def files(self) -> list[Path]:
        raise NotImplementedError

    def labels(self, files: Sequence[Path], num_classes: int | None = None) -> list[int]:
        """One class index (0-based) per file, in the order of ``files``; with ``num_classes``,
        a label outside ``[0, num_classes)`` raises a DataSourceError naming where it comes
        from (the file and the line)."""
        raise NotImplementedError


SOURCES: Registry[ImageSource] = Registry("data source", "data.source", name_key="data.source")


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


@SOURCES.register("folder")
class FolderSource(ImageSource):
    """Any folder of images, flat or nested.

    Labels, in this order: ``labels.csv`` beside the images (``file,label`` with a header; the
    file is a path relative to the folder; integer labels, 1-based when the smallest label in
    the whole file is 1, as Oxford's official ids, else 0-based), or else class sub-folders as
    torchvision's ``ImageFolder`` (each image's first-level folder is its class; classes in
    sorted order).
    """

    def files(self) -> list[Path]:
        return list_folder_images(self.root)

    def labels(self, files: Sequence[Path], num_classes: int | None = None) -> list[int]:
        table = self.root / LABELS_CSV
        if table.is_file():
            return csv_labels(table, self.root, files, num_classes)
        return subfolder_labels(self.root, files, num_classes)

    def class_folders(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())


def out_of_range(where: str, label: int, index: int, num_classes: int) -> DataSourceError:
    """The one paragraph for a label the network has no class for."""
    return DataSourceError(
        f"{where}: label {label} is class index {index} (0-based), but "
        f"model.net.num_classes={num_classes} allows 0 to {num_classes - 1}. Fix that label, or "
        f"set model.net.num_classes to the number of classes in the data (at least {index + 1})."
    )


def csv_labels(
    table: Path, root: Path, files: Sequence[Path], num_classes: int | None = None
) -> list[int]:
    """Labels of ``files`` from a ``file,label`` CSV (errors name the file and the line).

    The first line is the header ``file,label``; a first line that is itself a ``file,label``
    row with an integer label is read as data. Excel's byte-order mark is ignored.
    """
    by_file: dict[str, tuple[int, int]] = {}  # relative path -> (label, line)
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataSourceError(f"Could not read the labels file {table}: {error}.") from error
    start = 0 if rows and _is_label_row(rows[0]) else 1
    for line, row in enumerate(rows[start:], start=start + 1):
        if not row or not "".join(row).strip():
            continue
        if not _is_label_row(row):
            raise DataSourceError(
                f"{table}, line {line}: {','.join(row)!r} is not `file,label` with an integer "
                "label. Fix that line (the first line is the header `file,label`)."
            )
        key = row[0].strip()
        if key in by_file:
            raise DataSourceError(
                f"{table}, line {line}: {key!r} already has a label on line {by_file[key][1]}. "
                "Give each image one line."
            )
        by_file[key] = (int(row[1]), line)
    if not by_file:
        raise DataSourceError(
            f"The labels file {table} lists no `file,label` rows: add one line per image."
        )
    base = 1 if min(label for label, _ in by_file.values()) == 1 else 0
    labels, lines = [], []
    for path in files:
        key = path.relative_to(root).as_posix()
        if key not in by_file:
            raise DataSourceError(
                f"{table} has no label for {key!r} (one of the {len(files)} images under "
                f"{root}). Add a line `{key},<label>` or remove the image."
            )
        label, line = by_file[key]
        if label < base:
            raise DataSourceError(
                f"{table}, line {line}: label {label} is negative; labels are class indices "
                "from 0 (or from 1, as Oxford's ids, when the smallest label in the file is 1)."
            )
        labels.append(label - base)
        lines.append(line)
    if num_classes is not None:
        bad = [
            (line, label) for line, label in zip(lines, labels, strict=True) if label >= num_classes
        ]
        if bad:
            line, index = min(bad)
            raise out_of_range(f"{table}, line {line}", index + base, index, num_classes)
    return labels


def _is_label_row(row: Sequence[str]) -> bool:
    return (
        len(row) == 2
        and bool(row[0].strip())
        and re.fullmatch(r"-?\d+", row[1].strip()) is not None
    )


def subfolder_labels(
    root: Path, files: Sequence[Path], num_classes: int | None = None
) -> list[int]:
    """``ImageFolder`` labels: the index of each file's first-level folder among them all."""
    parts = [path.relative_to(root).parts for path in files]
    loose = [files[i] for i, p in enumerate(parts) if len(p) < 2]
    if loose:
        raise DataSourceError(
            f"data.labels=true, but {root} has no {LABELS_CSV} and {loose[0]}"
            + (f" (and {len(loose) - 1} more)" if len(loose) > 1 else "")
            + f" is not inside a class sub-folder. Put a `file,label` CSV named {LABELS_CSV} "
            "in the folder, or sort the images into one sub-folder per class."
        )
    classes = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(classes)}
    if num_classes is not None and len(classes) > num_classes:
        folder = classes[num_classes]
        first = next(files[i] for i, p in enumerate(parts) if p[0] == folder)
        raise DataSourceError(
            f"{first}: its class folder {folder!r} is class index {num_classes} (0-based; "
            f"{root} has {len(classes)} class sub-folders, in sorted order as ImageFolder), but "
            f"model.net.num_classes={num_classes} allows 0 to {num_classes - 1}. Set "
            f"model.net.num_classes={len(classes)}, or remove the extra folders."
        )
    return [index[p[0]] for p in parts]


@SOURCES.register("flowers102")
class Flowers102Source(ImageSource):
    """All 8,189 Oxford 102 Flowers images (train + val + test, as the book trains on), with
    torchvision's labels (0..101). torchvision's ``Flowers102`` downloads and checks them."""

    lists_cheaply = False

    def __init__(self, root: str | Path, download: bool = False) -> None:
        super().__init__(root, download)
        self._files_and_labels: dict[Path, int] | None = None

    def _splits(self) -> list[object]:
        from torchvision.datasets import Flowers102

        try:
            return [
                Flowers102(str(self.root), split=split, download=self.download)
                for split in ("train", "val", "test")
            ]
        except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
            raise DataSourceError(
                f"Could not load Oxford 102 Flowers from data.root={str(self.root)!r} "
                f"(download={self.download}): {type(error).__name__}: {error}. torchvision's "
                "Flowers102 tried to find or download the archive from the Oxford VGG server into "
                "that folder. Without internet, copy the images elsewhere and train on them with "
                "`data=folder data.root=/path/to/images` (e.g. ../shared/data/flowers102_64)."
            ) from error

    def _table(self) -> dict[Path, int]:
        """Every image and its label, read once (torchvision parses the .mat files)."""
        if self._files_and_labels is None:
            table: dict[Path, int] = {}
            for dataset in self._splits():
                for path, label in zip(dataset._image_files, dataset._labels, strict=True):
                    table[Path(path)] = int(label)
            self._files_and_labels = table
        return self._files_and_labels

    def files(self) -> list[Path]:
        return sorted(self._table())

    def labels(self, files: Sequence[Path], num_classes: int | None = None) -> list[int]:
        table = self._table()
        labels = [table[Path(path)] for path in files]
        for path, label in zip(files, labels, strict=True):
            if num_classes is not None and label >= num_classes:
                where = f"{path} (torchvision's Flowers102 labels)"
                raise out_of_range(where, label, label, num_classes)
        return labels


def list_flowers102_images(root: str | Path, download: bool = True) -> list[Path]:
    """All Oxford 102 Flowers images (the notebooks' fallback)."""
    return Flowers102Source(root, download).files()


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per line, in class-index order (blank lines and ``#`` comments
    ignored); ``oxford102`` names the 102 Oxford Flowers species shipped with flowerdiff."""
    path = BUILTIN_CLASS_NAMES.get(str(path), Path(path).expanduser())
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
        names = [line for line in lines if line and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as error:
        raise DataSourceError(
            f"data.class_names={str(path)!r} cannot be read ({error}). Give a text file with one "
            "class name per line, or null."
        ) from error
    if not names:
        raise DataSourceError(f"data.class_names={str(path)!r} holds no names.")
    return names
