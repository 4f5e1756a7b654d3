"""``sample(cfg)``: images, a grid, and the denoising trajectory (strip PNG + GIF) of a checkpoint.

Image ``i`` depends only on ``(seed, i)`` (see ``DiffusionModule.sample``), so the same command
gives the same files on any device and batch size. The checkpoint is loaded with
``weights_only=True``; its ``state_dict`` holds the EMA weights when training used EMA.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from flowerdiff.checkpoint import load_module
from flowerdiff.diffusion import Sampler
from flowerdiff.evaluate import autocast_context, resolve_device
from flowerdiff.images import (
    grid,
    nearest_steps,
    save_gif,
    save_images,
    save_png,
    trajectory_grid,
    trajectory_targets,
)
from flowerdiff.module import DiffusionModule

log = logging.getLogger(__name__)


def configured_sampler(cfg: DictConfig, module: DiffusionModule) -> Sampler:
    """``sampler`` from the command line (else the checkpoint's own), with the ``steps`` and
    ``eta`` shortcuts applied."""
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") else copy.copy(module.sampler)
    if cfg.get("steps") is not None:
        sampler.num_inference_steps = int(cfg.steps)
    if cfg.get("eta") is not None:
        if not hasattr(sampler, "eta"):
            raise ValueError(
                f"eta={cfg.eta} only applies to DDIM, but the sampler is {type(sampler).__name__}."
                " Drop `eta=...` or choose `sampler=ddim`."
            )
        sampler.eta = float(cfg.eta)
    return sampler


def sample(cfg: DictConfig) -> dict[str, Path | list[Path]]:
    """Write ``images/NNNNN.png``, ``grid.png``, ``trajectory.png`` and ``trajectory.gif`` into
    ``cfg.out_dir``; returns their paths."""
    if not cfg.get("ckpt_path"):
        raise ValueError(
            "Pass the checkpoint to sample from: ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    if cfg.num_images < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"num_images={cfg.num_images} and batch_size={cfg.batch_size} must both be >= 1."
        )
    device = resolve_device(str(cfg.device))
    module = load_module(cfg.ckpt_path, map_location=device)
    sampler = configured_sampler(cfg, module)
    out_dir = Path(cfg.out_dir)
    keep = min(int(cfg.trajectory_images), int(cfg.num_images))
    log.info("Sampling %d images with %r on %s", cfg.num_images, sampler, device)

    batches, trajectory = [], None
    bar = tqdm(total=cfg.num_images, desc="Sampling", unit="img")
    for start in range(0, cfg.num_images, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num_images - start)
        with autocast_context(cfg.precision, device):
            out = module.sample(
                n,
                seed=cfg.seed,
                start_index=start,
                sampler=sampler,
                return_intermediates=start == 0 and keep > 0,
                progress=True,
            )
        if trajectory is None and out.intermediates:
            trajectory = (
                out.timesteps,
                [x[:keep].cpu() for x in out.intermediates],
                [x[:keep].cpu() for x in out.pred_x0] if cfg.show_pred_x0 else None,
            )
        batches.append(out.images.cpu())
        bar.update(n)
    bar.close()

    images = torch.cat(batches)
    written: dict[str, Path | list[Path]] = {
        "images": save_images(images, out_dir / "images"),
        "grid": save_png(grid(images), out_dir / "grid.png"),
    }
    if trajectory is not None:
        timesteps, intermediates, pred_x0 = trajectory
        targets = trajectory_targets(module.schedule.num_timesteps, cfg.trajectory_columns)
        steps = nearest_steps(timesteps, targets)
        strip = trajectory_grid(intermediates, pred_x0, steps)
        written["trajectory"] = save_png(strip, out_dir / "trajectory.png")
        frames = [
            grid(torch.cat([x, x0]) if pred_x0 else x, nrow=keep)
            for x, x0 in zip(intermediates, pred_x0 or intermediates, strict=True)
        ]
        written["gif"] = save_gif(frames, out_dir / "trajectory.gif")
        log.info("Trajectory columns at t = %s", ", ".join(str(timesteps[i]) for i in steps))
    log.info("Wrote %d images, grid.png and the trajectory to %s", len(images), out_dir)
    return written
