"""Decode, resize and crop every image once, and keep the result as one uint8 tensor on disk.

Epochs after the first then do no JPEG decoding at all: a batch is a slice of a tensor. The
cache key covers the file list (paths and contents), the resolution and the resize rule, so a
changed folder is never served stale, and a folder copied or restored unchanged (new mtimes,
as rsync, CI checkouts or a re-mounted data set give) is still served from the cache.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2

from flowerdiff.files import atomic_torch_save

log = logging.getLogger(__name__)

CACHE_VERSION = 2


def cache_key(files: Sequence[Path], image_size: int) -> str:
    """A digest of what determines the decoded tensor: every file's path and bytes (reading
    them costs about a second for the 7,370 flowers, 0.1 % of decoding them)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|size={image_size}|resize-short-center-crop".encode())
    for path in files:
        with open(path, "rb") as handle:
            content = hashlib.file_digest(handle, "blake2b").hexdigest()
        digest.update(f"{path.resolve()}|{content}\n".encode())
    return digest.hexdigest()[:16]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode: grayscale, palette, RGBA (alpha dropped), and 16-bit ('I;16', 'I')."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / scale * 255.0).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def decode_images(files: Sequence[Path], image_size: int) -> tuple[torch.Tensor, list[Path]]:
    """Decode ``files`` to a ``[N, 3, S, S]`` uint8 tensor; return it with the unreadable files.

    The book's geometry: resize the short side to ``image_size`` (bilinear, antialiased, as the book), then
    center-crop. Smaller images are upscaled the same way.
    """
    resize_crop = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )
    images: list[torch.Tensor] = []
    bad: list[Path] = []
    previous_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is corrupt, not an image
    try:
        for path in files:
            try:
                with Image.open(path) as image, warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PIL's palette/transparency chatter
                    image.load()
                    images.append(resize_crop(to_rgb(image)))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                bad.append(path)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous_truncated
    stacked = (
        torch.stack(images)
        if images
        else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    )
    return stacked, bad


def load_or_build(
    files: Sequence[Path], image_size: int, cache_dir: str | Path | None
) -> tuple[torch.Tensor, list[Path]]:
    """The decoded tensor for ``files``, from the cache when it is there, built (and saved) if not.

    Returns the images and the files that could not be decoded (skipped, listed once).
    """
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir).expanduser() / f"images-{cache_key(files, image_size)}.pt"
        if cache_path.is_file():
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            return cached["images"], [Path(p) for p in cached["bad_files"]]
    log.info(
        "Decoding %d images at %dx%d (once; cached afterwards)", len(files), image_size, image_size
    )
    images, bad = decode_images(files, image_size)
    if cache_path is not None:
        atomic_torch_save({"images": images, "bad_files": [str(p) for p in bad]}, cache_path)
    return images, bad
