"""Turn model-space images ([-1, 1] tensors) into grids, trajectory strips, PNGs and GIFs, and
scores into the guidance trade-off plot.

Every figure the callbacks log and ``scripts/sample.py`` / ``scripts/evaluate.py`` write goes
through here, so a figure in the dashboard and one on disk look the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid, save_image

from flowerdiff.diffusion import Diffusion, SamplerOutput

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] model space -> [0, 1] float on the CPU (clamped: early x_t overshoot [-1, 1])."""
    return images.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).div(2.0)


def grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """[B, C, H, W] in [-1, 1] -> one [C, H', W'] image in [0, 1] with ``nrow`` images per row
    (default: a near-square grid); white padding separates the images."""
    if nrow is None:
        nrow = max(1, round(images.shape[0] ** 0.5))
    return make_grid(to_unit(images), nrow=nrow, padding=padding, pad_value=1.0)


def trajectory_steps(diffusion: Diffusion, out: SamplerOutput, columns: int = 5) -> list[int]:
    """Indices of the sampler steps shown as trajectory columns: the visited levels nearest
    ``columns`` targets evenly spaced in the family's progress from noise to data, pure noise
    excluded (T = 1000, 5 columns, DDIM-50: the book's t = 800, 600, 400, 200, 0)."""
    if columns < 1:
        raise ValueError(
            f"trajectory columns={columns} is invalid: it is the number of steps shown between "
            "noise and data and must be >= 1 (the book shows 5: t = 800, 600, 400, 200, 0)."
        )
    targets = [(k + 1) / columns for k in range(columns)]
    progress = [diffusion.progress(level) for level in out.levels]
    # a tie goes to the noisier step
    return [min(range(len(progress)), key=lambda i: abs(progress[i] - p)) for p in targets]


@dataclass(frozen=True)
class Trajectory:
    """A trajectory figure and its caption."""

    image: Tensor  # [C, H, W] in [0, 1]
    caption: str


def trajectory_figure(
    diffusion: Diffusion,
    out: SamplerOutput,
    num_images: int = 4,
    columns: int = 5,
    show_pred_x0: bool = True,
    padding: int = 2,
) -> Trajectory:
    """Rows are samples, columns are sampler steps (:func:`trajectory_steps`): x after that
    step, so the last column is the final sample. With ``show_pred_x0``, each sample gets a
    second row with the model's x0 estimate at that step, which shows what the denoiser
    believes long before x is clean. ``out`` must hold its intermediates."""
    if not out.intermediates:
        raise ValueError("A trajectory needs the intermediate steps: sample with trajectory on.")
    steps = trajectory_steps(diffusion, out, columns)
    rows = []
    for b in range(min(num_images, out.intermediates[0].shape[0])):
        rows.append(torch.stack([out.intermediates[i][b] for i in steps]))
        if show_pred_x0:
            rows.append(torch.stack([out.pred_x0[i][b] for i in steps]))
    image = grid(torch.cat(rows), nrow=len(steps), padding=padding)
    shown = ", ".join(out.labels[i] if out.labels else str(i) for i in steps)
    kind = "x / predicted x0 rows" if show_pred_x0 else "x rows"
    return Trajectory(image, f"{shown} ({kind})")


def trajectory_frames(out: SamplerOutput, num_images: int, show_pred_x0: bool) -> list[Tensor]:
    """One grid per sampler step (x, and x0 under it): the frames of the trajectory GIF."""
    frames = []
    for x, x0 in zip(out.intermediates, out.pred_x0 or out.intermediates, strict=True):
        x, x0 = x[:num_images], x0[:num_images]
        frames.append(grid(torch.cat([x, x0]) if show_pred_x0 else x, nrow=len(x)))
    return frames


def labelled_rows(image: Tensor, labels: Sequence[str], cell: int, padding: int = 2) -> Tensor:
    """A grid image ([C, H, W] in [0, 1], rows of ``cell``-pixel images) with each row's label
    written in a white margin on its left: class names beside a per-class grid."""
    picture = to_pil(image)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    margin = max(int(draw.textlength(label, font=font)) for label in labels) + 2 * padding
    out = Image.new("RGB", (picture.width + margin, picture.height), "white")
    out.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(out)
    for row, label in enumerate(labels):
        centre = padding + row * (cell + padding) + cell // 2
        draw.text((padding, centre), label, fill="black", font=font, anchor="lm")
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float().div(255)


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


SHARE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def tradeoff_figure(
    runs: Sequence[Mapping[str, Any]],
    distance: str = "fid",
    distance_label: str = "FID (lower is better)",
    shares: Sequence[str] = ("precision", "recall"),
    title: str = "Classifier-free guidance: fidelity vs diversity",
) -> Figure:
    """The guidance trade-off: ``distance`` (left axis) and the ``shares`` in [0, 1] that the
    runs hold (right axis) against each run's ``guidance_scale``.

    Drawn on a bare matplotlib ``Figure`` (no pyplot, no backend switch), so a callback, a
    script and a notebook's inline display can all use it.
    """
    from matplotlib.figure import Figure

    scales = [run["guidance_scale"] for run in runs]
    figure = Figure(figsize=(6, 4))
    distance_axis = figure.subplots()
    legend = distance_label.split(" (")[0]  # "FID (lower is better)" -> "FID"
    distance_axis.plot(scales, [run[distance] for run in runs], "o-", color="black", label=legend)
    distance_axis.set_xlabel("guidance scale w")
    distance_axis.set_ylabel(distance_label)
    share_axis = distance_axis.twinx()
    shown = [key for key in shares if all(key in run for run in runs)]
    for key, colour in zip(shown, SHARE_COLOURS, strict=False):
        share_axis.plot(scales, [run[key] for run in runs], "s--", color=colour, label=key)
    share_axis.set_ylabel(" / ".join(shown) if shown else "")
    share_axis.set_ylim(0, 1.02)
    handles = (
        distance_axis.get_legend_handles_labels()[0] + share_axis.get_legend_handles_labels()[0]
    )
    distance_axis.legend(handles=handles, loc="best")
    distance_axis.set_title(title)
    figure.tight_layout()
    return figure


def plot_tradeoff(runs: Sequence[Mapping[str, Any]], path: str | Path, **options: Any) -> Path:
    """Save :func:`tradeoff_figure` (FID, precision and recall per guidance scale) as a PNG:
    ``scripts/evaluate.py guidance_scale=[...]`` and the FID callback's ``guidance_scales``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tradeoff_figure(runs, **options).savefig(path, dpi=120)
    return path
