"""What the notebooks share: the size knob, where outputs go, and flower images that always exist.

The notebooks must run anywhere, from a laptop without data to CI in seconds. So the size is one
environment variable, and images come from the first of: ``$FLOWERDIFF_DATA``, the shared
``../shared/data/flowers102_64`` next to the repository, Oxford 102 Flowers (``full`` size only,
downloaded), or synthetic flowers written on the spot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import flowerdiff
from flowerdiff.data import DataSourceError, FlowersDataModule
from flowerdiff.data.sources import list_flowers102_images, list_folder_images
from flowerdiff.diffusion import Diffusion, build_diffusion
from flowerdiff.diffusion.analytic import GaussianOracle
from flowerdiff.training.module import DiffusionModule

SIZE_ENV = "FLOWERDIFF_NB_SIZE"
DATA_ENV = "FLOWERDIFF_DATA"
OUTPUT_ENV = "FLOWERDIFF_NB_OUTPUT"
CHECKPOINT_ENV = "FLOWERDIFF_CKPT"
SIZES = ("tiny", "full")


def notebook_size() -> str:
    """``$FLOWERDIFF_NB_SIZE``: ``tiny`` (seconds on a CPU, for tests) or ``full`` (default)."""
    size = os.environ.get(SIZE_ENV, "full").strip().lower()
    if size not in SIZES:
        raise ValueError(
            f"{SIZE_ENV}={size!r} is not a notebook size. Use 'tiny' (a few small images and "
            "training steps: runs in seconds on a CPU) or 'full' (real flowers, real training)."
        )
    return size


def repo_root() -> Path:
    """The checkout holding ``conf/``: ``$FLOWERDIFF_ROOT``, else the nearest parent of the
    working directory (notebooks run in ``notebooks/``), else the editable install's source."""
    if os.environ.get("FLOWERDIFF_ROOT"):
        return Path(os.environ["FLOWERDIFF_ROOT"]).expanduser().resolve()
    package_checkout = Path(flowerdiff.__file__).resolve().parents[2]
    for folder in (Path.cwd().resolve(), *Path.cwd().resolve().parents, package_checkout):
        if (folder / "conf" / "train.yaml").is_file():
            return folder
    raise FileNotFoundError(
        "Cannot find the flowerdiff repository (a folder with conf/train.yaml) above "
        f"{Path.cwd()}. Run the notebooks from inside the checkout, or set FLOWERDIFF_ROOT to it."
    )


def output_root() -> Path:
    """Where notebooks write runs and scratch files: ``$FLOWERDIFF_NB_OUTPUT``, else
    ``outputs/notebooks`` in the repository (ignored by git)."""
    if os.environ.get(OUTPUT_ENV):
        return Path(os.environ[OUTPUT_ENV]).expanduser().resolve()
    return repo_root() / "outputs" / "notebooks"


def checkpoint_path() -> Path | None:
    """``$FLOWERDIFF_CKPT`` (a training checkpoint), or None when it is unset or empty."""
    value = os.environ.get(CHECKPOINT_ENV, "").strip()
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class DemoImages:
    """A set of images, described the way the ``data`` config group does (source + root)."""

    source: str  # "folder" | "flowers102"
    root: Path
    origin: str  # why this one was chosen, for the reader

    def overrides(self) -> list[str]:
        """Hydra overrides that train on these images."""
        return [f"data={self.source}", f"data.root={self.root}"]

    def load(self, image_size: int, max_images: int | None = None) -> Tensor:
        """The first ``max_images`` images as ``[N, 3, S, S]`` floats in [-1, 1], resized and
        cropped exactly as training sees them (the data module's own decoding)."""
        data = FlowersDataModule(
            source=self.source,
            root=str(self.root),
            image_size=image_size,
            max_images=max_images,
            cache_dir=None,
        )
        return data.load_images().float().div(127.5).sub(1.0)

    def __str__(self) -> str:
        return f"{self.source} images in {self.root} ({self.origin})"


def find_images(size: str) -> DemoImages:
    """The first available of ``$FLOWERDIFF_DATA``, ``../shared/data/flowers102_64``, Oxford 102
    Flowers (``full`` only; download) and synthetic flowers in :func:`output_root`."""
    if os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV]).expanduser().resolve()
        list_folder_images(root)  # a clear error now rather than in the middle of a notebook
        return DemoImages("folder", root, f"${DATA_ENV}")
    shared = repo_root().parent / "shared" / "data" / "flowers102_64"
    if shared.is_dir():
        return DemoImages("folder", shared.resolve(), "the shared flowers folder")
    if size == "full":
        root = repo_root() / "data" / "flowers102"
        try:
            list_flowers102_images(root, download=True)
            return DemoImages("flowers102", root, "Oxford 102 Flowers via torchvision")
        except DataSourceError as error:
            print(f"Oxford 102 Flowers is unavailable, using synthetic flowers instead:\n{error}")
    folder = write_flower_images(output_root() / "synthetic_flowers", count=32)
    return DemoImages("folder", folder, "synthetic flowers: no real images found")


def write_flower_images(folder: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` synthetic RGB flowers (petals of random number, size and colour around a
    centre disk, on a green background): structured enough for a diffusion model to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    for index in range(count):
        cx, cy = rng.uniform(-0.25, 0.25, 2)
        radius, petals, turn = rng.uniform(0.45, 0.85), rng.integers(4, 9), rng.uniform(0, np.pi)
        r, theta = np.hypot(xs - cx, ys - cy), np.arctan2(ys - cy, xs - cx)
        edge = radius * (0.45 + 0.55 * np.abs(np.cos(petals * (theta - turn) / 2)))
        petal = 1 / (1 + np.exp((r - edge) / 0.03))
        centre = 1 / (1 + np.exp((r - 0.22 * radius) / 0.02))
        background = np.stack([0.15 + 0.1 * ys, 0.35 - 0.1 * ys, 0.12 + 0 * ys], -1)
        shade = (1 - 0.35 * np.clip(r / edge, 0, 1))[..., None]
        colour = rng.uniform(0.3, 1.0, 3) * shade
        pixels = background * (1 - petal[..., None]) + colour * petal[..., None]
        pixels = pixels * (1 - centre[..., None]) + np.array([0.85, 0.65, 0.1]) * centre[..., None]
        image = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(image).save(folder / f"flower_{index:03d}.png")
    return folder


def analytic_module(
    images: Tensor, diffusion: Diffusion | None = None, sampler: dict | None = None
) -> DiffusionModule:
    """A DiffusionModule whose network is the exact denoiser for the per-pixel Gaussian fit of
    ``images`` ``[N, C, H, W]`` (:class:`~flowerdiff.diffusion.analytic.GaussianOracle`): it
    samples like a trained checkpoint (seeds, any sampler) with no training at all. Default:
    the book's process with its DDIM-50."""
    if diffusion is None:
        diffusion = build_diffusion(
            {"name": "ddpm"}, sampler or {"name": "ddim", "use_clipped_model_output": True}
        )
    return DiffusionModule(
        GaussianOracle.fit(images, diffusion), diffusion, images.shape[1:]
    ).eval()


def device() -> torch.device:
    """The GPU when there is one: sampling a real model on a CPU is slow."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
