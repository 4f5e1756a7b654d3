"""``sample(cfg)``: images, a grid, and the denoising trajectory (strip PNG + GIF) of a model.

Image ``i`` depends only on ``(seed, i)`` (and its class), so the same command gives the same
files on any device and batch size. The model is a training checkpoint (loaded as data, see
:mod:`flowerdiff.infra.checkpoints`) or an export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from flowerdiff.diffusion.guidance import Guidance
from flowerdiff.infra.config import (
    Problems,
    check_output_dir,
    check_positive_int,
    configured_sampler,
    plain,
)
from flowerdiff.infra.devices import autocast_context, resolve_device
from flowerdiff.infra.exports import load_model
from flowerdiff.training.generate import resolve_labels, sample_batches
from flowerdiff.training.module import DiffusionModule
from flowerdiff.viz.figures import (
    grid,
    labelled_rows,
    save_gif,
    save_images,
    save_png,
    trajectory_figure,
    trajectory_frames,
)

log = logging.getLogger(__name__)


def check_model_path(cfg: DictConfig, problems: Problems) -> None:
    path = cfg.get("ckpt_path")
    if not path:
        problems.add(
            "`ckpt_path` is missing: pass the model to use, e.g. "
            "ckpt_path=outputs/train/runs/<date>/checkpoints/last.ckpt or an export folder."
        )
    elif not Path(str(path)).expanduser().exists():
        problems.add(
            f"`ckpt_path={path!r}` does not exist. Pass a .ckpt file written by training "
            "(e.g. outputs/train/runs/<date>/checkpoints/last.ckpt) or a folder written by "
            "scripts/export.py."
        )


def guidance_from(cfg: DictConfig, problems: Problems) -> Guidance | None:
    """``guidance_scale`` / ``guidance_interval`` / ``guidance_rescale`` (None: plain)."""
    scale = cfg.get("guidance_scale")
    if scale is None:
        return None
    with problems.catch("guidance_scale"):
        interval = plain(cfg.get("guidance_interval"))
        return Guidance(scale, interval, cfg.get("guidance_rescale") or 0.0)
    return None


def load_for_sampling(cfg: DictConfig, problems: Problems) -> tuple[DiffusionModule, Any]:
    """Device and model, after the cheap checks (``problems`` raised first)."""
    device = None
    with problems.catch("device"):
        device = resolve_device(cfg.device)
    if device is not None:
        with problems.catch("precision"):
            autocast_context(cfg.precision, device)
    problems.raise_if_any()
    return load_model(cfg.ckpt_path, map_location=device, weights=cfg.get("weights", "ema")), device


def sample(cfg: DictConfig) -> dict[str, Path | list[Path]]:
    """Write ``images/NNNNN.png``, ``grid.png``, ``trajectory.png`` and ``trajectory.gif`` into
    ``cfg.out_dir``; returns their paths."""
    problems = Problems()
    check_model_path(cfg, problems)
    for key in ("num_images", "batch_size", "trajectory_columns"):
        check_positive_int(cfg.get(key), key, problems)
    check_positive_int(cfg.get("trajectory_images"), "trajectory_images", problems, minimum=0)
    guidance = guidance_from(cfg, problems)
    check_output_dir(cfg.out_dir, "out_dir", problems)
    module, device = load_for_sampling(cfg, problems)

    with problems.catch("sampler"):
        sampler = configured_sampler(module.diffusion, cfg.get("sampler"), cfg.steps, cfg.eta)
    labels = None
    with problems.catch("class_labels"):
        labels = resolve_labels(
            module, cfg.num_images, plain(cfg.get("class_labels")), cfg.get("per_class")
        )
    if guidance is not None and labels is None:
        problems.add(
            "`guidance_scale` applies to class-conditional models; this one is unconditional. "
            "Drop guidance_scale."
        )
    problems.raise_if_any()
    num_images = len(labels) if labels is not None else cfg.num_images
    out_dir = Path(cfg.out_dir)
    keep = min(int(cfg.trajectory_images), num_images)
    log.info("Sampling %d images with %r on %s", num_images, sampler, device)

    batches, first = [], None
    for batch in sample_batches(
        module,
        num_images,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        sampler=sampler,
        labels=labels,
        guidance=guidance,
        autocast=autocast_context(cfg.precision, device),
        trajectory_images=keep,
        progress=True,
    ):
        first = first or batch.output
        batches.append(batch.output.images.cpu())
    images = torch.cat(batches)
    written: dict[str, Path | list[Path]] = {"images": save_images(images, out_dir / "images")}
    if labels is not None and cfg.get("per_class"):
        classes = labels[:: int(cfg.per_class)].tolist()
        names = module.spec.class_names if module.spec else None
        rows = [names[c] if names else f"class {c}" for c in classes]
        figure = labelled_rows(grid(images, nrow=int(cfg.per_class)), rows, images.shape[-1])
        written["grid"] = save_png(figure, out_dir / "grid.png")
    else:
        written["grid"] = save_png(grid(images), out_dir / "grid.png")
    if keep > 0 and first is not None and first.intermediates:
        figure = trajectory_figure(
            module.diffusion, first, keep, cfg.trajectory_columns, cfg.show_pred_x0
        )
        written["trajectory"] = save_png(figure.image, out_dir / "trajectory.png")
        frames = trajectory_frames(first, keep, cfg.show_pred_x0)
        written["gif"] = save_gif(frames, out_dir / "trajectory.gif")
        log.info("Trajectory columns: %s", figure.caption)
    log.info("Wrote %d images, grid.png and the trajectory to %s", len(images), out_dir)
    return written
