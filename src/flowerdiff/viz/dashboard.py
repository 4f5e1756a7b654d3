"""Figures to the dashboard: one call sends an image to whichever loggers show images.

W&B and TensorBoard get the figure; CSV and no logger keep just the PNG, which is always saved
under ``<run dir>/images/<key>/step_<step>.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.io import read_image

from flowerdiff.viz.figures import save_png


def image_path(trainer: L.Trainer, key: str, step: int) -> Path:
    """``<run dir>/images/<key>/step_<step>.png``: one folder per figure, sorted by step."""
    return Path(trainer.default_root_dir) / "images" / key / f"step_{step:07d}.png"


def log_image(
    trainer: L.Trainer,
    key: str,
    image: Tensor | str | Path,
    step: int | None = None,
    caption: str | None = None,
) -> Path:
    """Save ``image`` ([C, H, W] in [0, 1], or a PNG path) into the run directory and show it in
    W&B and TensorBoard when those loggers are on; CSV and no logger keep just the file.

    Call on global rank zero only (the callbacks do): it touches no collective.
    """
    step = trainer.global_step if step is None else step
    path = image_path(trainer, key, step)
    if isinstance(image, Tensor):
        save_png(image, path)
    elif Path(image).resolve() != path.resolve():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key, [str(path)], step=step, **extra)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, read_image(str(path)), global_step=step)
    return path
