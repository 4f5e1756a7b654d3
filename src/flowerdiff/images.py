"""Turn model-space images ([-1, 1] tensors) into grids, trajectory strips, PNGs and GIFs.

Every figure the callbacks log and ``scripts/sample.py`` writes goes through here, so a grid in
the dashboard and a grid on disk look the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] model space -> [0, 1] float on the CPU (clamped: early x_t overshoot [-1, 1])."""
    return images.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).div(2.0)


def grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """[B, C, H, W] in [-1, 1] -> one [C, H', W'] image in [0, 1] with ``nrow`` images per row
    (default: a near-square grid); white padding separates the images."""
    if nrow is None:
        nrow = max(1, round(images.shape[0] ** 0.5))
    return make_grid(to_unit(images), nrow=nrow, padding=padding, pad_value=1.0)


def trajectory_targets(num_train_timesteps: int, columns: int = 5) -> list[int]:
    """``columns`` timesteps evenly spaced from T down to 0, T itself (pure noise) excluded:
    T = 1000 and 5 columns give the book's t = 800, 600, 400, 200, 0."""
    if columns < 1:
        raise ValueError(
            f"trajectory columns={columns} is invalid: it is the number of timesteps shown "
            "between T and 0 and must be >= 1 (the book shows 5: t = 800, 600, 400, 200, 0)."
        )
    return [round(num_train_timesteps * (1 - (k + 1) / columns)) for k in range(columns)]


def nearest_steps(timesteps: Sequence[int], targets: Sequence[int]) -> list[int]:
    """Index of the visited timestep nearest each target (a tie goes to the noisier step)."""
    return [min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - t)) for t in targets]


def trajectory_grid(
    intermediates: Sequence[Tensor],
    pred_x0: Sequence[Tensor] | None,
    steps: Sequence[int],
    padding: int = 2,
) -> Tensor:
    """Rows are samples, columns are the sampler steps ``steps`` (indices into the sampler's
    lists): ``intermediates[i]`` is x after step i, so the last column is the final sample.
    With ``pred_x0``, each sample gets a second row with the model's x0 estimate at that step,
    which shows what the denoiser believes long before x_t is clean."""
    rows = []
    for b in range(intermediates[0].shape[0]):
        rows.append(torch.stack([intermediates[i][b] for i in steps]))
        if pred_x0:
            rows.append(torch.stack([pred_x0[i][b] for i in steps]))
    return grid(torch.cat(rows), nrow=len(steps), padding=padding)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Save one [C, H, W] image in [0, 1] (e.g. from :func:`grid`) as a PNG, creating parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path


def save_images(images: Tensor, folder: str | Path, start_index: int = 0) -> list[Path]:
    """One PNG per image of a [-1, 1] batch, named by global index so shards never collide."""
    folder = Path(folder)
    return [
        save_png(to_unit(image), folder / f"{start_index + k:05d}.png")
        for k, image in enumerate(images)
    ]


def to_pil(image: Tensor) -> Image.Image:
    """[C, H, W] in [0, 1] -> PIL RGB image (uint8, rounded as torchvision's save_image)."""
    array = image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_gif(
    frames: Sequence[Tensor], path: str | Path, frame_ms: int = 80, hold_last_ms: int = 1500
) -> Path:
    """Animated GIF of [C, H, W] frames in [0, 1]; the last frame (the result) is held longer."""
    if not frames:
        raise ValueError("save_gif needs at least one frame.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [to_pil(frame) for frame in frames]
    durations = [frame_ms] * (len(images) - 1) + [hold_last_ms]
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False
    )
    return path
