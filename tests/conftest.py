"""Shared fixtures: small images written by the tests, and the real configs composed and shrunk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "conf"
SHARED_FLOWERS = REPO_ROOT.parent / "shared" / "data" / "flowers102_64"


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for Inception in tests: uint8 images -> 8 features
    (Hydra builds it by name, e.g. ``test_fid.TinyFeatures``, in side processes too)."""

    num_features = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.zero_()

    def forward(self, images: Tensor) -> Tensor:
        return torch.tanh(self.conv(images.float() / 127.5 - 1)).mean(dim=(2, 3))


# The smallest real run: unet_tiny on 16x16 images, one epoch of 3 CPU steps (12 train and 4
# validation images of the 16 that `image_folder` writes), no network.
TINY_OVERRIDES = [
    "model=unet_tiny",
    "data=folder",
    "data.image_size=16",
    "data.batch_size=4",
    "data.val_fraction=0.25",
    "sampler.num_inference_steps=4",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.benchmark=false",
    "lr_scheduler.warmup_steps=2",
    "logger=csv",
    "~callbacks.progress_bar",
    "~callbacks.fid",  # needs the Inception weights; tests/test_fid.py adds a small one
    "callbacks.ema.decay=0.9",
    "callbacks.model_checkpoint.every_n_epochs=1",  # epoch_0000.ckpt, besides last.ckpt
    "callbacks.denoising_grid.num_images=4",  # its end-of-training grid: 4 images, 2 with
    "callbacks.denoising_grid.trajectory_images=2",  # a trajectory, 2 forward-diffusion rows
    "callbacks.denoising_grid.forward_images=2",
]


def write_images(folder: Path, count: int, size: int = 24, seed: int = 0) -> Path:
    """Write ``count`` small RGB PNGs: smooth colour blobs, so models have something to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size)), -1)
    for index in range(count):
        centre = rng.uniform(-0.5, 0.5, 2)
        blob = np.exp(-((grid - centre) ** 2).sum(-1) / rng.uniform(0.05, 0.3))
        colour = rng.uniform(0, 255, 3)
        pixels = (blob[..., None] * colour + (1 - blob[..., None]) * 40).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index:03d}.png")
    return folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_images(tmp_path / "images", count=16)


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", output_dir: Path | None = None
) -> DictConfig:
    """Compose the real config tree (with Hydra's own config, so `${hydra:...}` resolves)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def tiny_config(tmp_path: Path, image_folder: Path) -> Callable[..., DictConfig]:
    """A factory for the tiny training config, writing everything under ``tmp_path``."""

    def make(*extra: str, config_name: str = "train") -> DictConfig:
        overrides = [
            *TINY_OVERRIDES,
            f"data.root={image_folder}",
            f"paths.root_dir={tmp_path}",
            *extra,
        ]
        return compose_config(overrides, config_name, output_dir=tmp_path / "run")

    return make


@pytest.fixture
def tiny_checkpoint(tiny_config, tmp_path: Path) -> Path:
    """A real checkpoint of the tiny config as training lays it out (the module's state dict and
    its ModelSpec), with untrained weights: ``tmp_path/run/checkpoints/last.ckpt``."""
    import torch

    from flowerdiff.infra.config import build_module

    module = build_module(tiny_config())
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "flowerdiff": module.spec.to_dict()}, path)
    return path


@pytest.fixture
def forbidden_extractor():
    """A feature extractor that fails the test if it is ever called: for checks that must
    happen before any (reference) features are computed."""
    from torch import nn

    class ForbiddenFeatures(nn.Module):
        def forward(self, images):
            raise AssertionError("features were computed before the input was checked")

    return ForbiddenFeatures()


def can_write_in(folder: Path) -> bool:
    """Try it: create ``folder`` and a file in it (and remove what was created)."""
    import shutil
    import tempfile

    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False
    finally:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)


@pytest.fixture
def unwritable_dir(tmp_path: Path):
    """A folder path that cannot be created or written: below a read-only folder, or, as root
    (who ignores permissions), below /sys, where even root may not create folders. Skips when
    this machine has neither."""
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    try:
        for candidate in (read_only / "out", Path("/sys/flowerdiff-test/out")):
            if not can_write_in(candidate):
                yield candidate
                return
        pytest.skip("no folder on this machine refuses writes to this user")
    finally:
        read_only.chmod(0o755)  # so that pytest can clean tmp_path up
