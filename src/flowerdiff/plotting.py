"""Matplotlib views of model-space images for the notebooks, with labelled rows and columns.

The grids themselves come from :mod:`flowerdiff.images` (the same ones the callbacks log), so a
notebook figure and a dashboard figure show the same thing; this module only adds the axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from torch import Tensor

from flowerdiff.diffusion import SamplerOutput
from flowerdiff.images import grid, nearest_steps, trajectory_grid, trajectory_targets

PADDING = 2


def show_grid(
    images: Tensor,
    nrow: int | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.0,
) -> Axes:
    """Show a ``[B, C, H, W]`` batch in [-1, 1] as one grid, ``nrow`` images per row."""
    if nrow is None:
        nrow = max(1, round(images.shape[0] ** 0.5))
    figure = grid(images, nrow=nrow, padding=PADDING)
    return _show(figure, images.shape[-1], row_labels, col_labels, title, cell_inches)


def show_trajectory(
    out: SamplerOutput,
    num_train_timesteps: int,
    num_images: int = 2,
    columns: int = 5,
    show_pred_x0: bool = True,
    title: str | None = None,
    cell_inches: float = 1.0,
) -> Axes:
    """The denoising trajectory of ``out`` (sampled with ``return_intermediates=True``): one
    row of ``x_t`` per image (and one of the predicted x0), columns at the visited timesteps
    nearest ``columns`` targets evenly spaced below ``num_train_timesteps`` (T = 1000 and 5
    columns: the book's t = 800, 600, 400, 200, 0)."""
    if not out.intermediates:
        raise ValueError(
            "show_trajectory needs the intermediate steps: sample with return_intermediates=True."
        )
    steps = nearest_steps(out.timesteps, trajectory_targets(num_train_timesteps, columns))
    figure = trajectory_grid(
        [x[:num_images] for x in out.intermediates],
        [x[:num_images] for x in out.pred_x0] if show_pred_x0 else None,
        steps,
        padding=PADDING,
    )
    per_image = ["x_t", "predicted x0"] if show_pred_x0 else ["x_t"]
    rows = [f"{label} #{k}" for k in range(min(num_images, len(out.images))) for label in per_image]
    cols = [f"t={out.timesteps[i]}" for i in steps]
    return _show(figure, out.images.shape[-1], rows, cols, title, cell_inches)


def _show(
    figure: Tensor,
    image_size: int,
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    title: str | None,
    cell_inches: float,
) -> Axes:
    """Draw a grid image (``[C, H, W]`` in [0, 1]) with one tick label per row and column."""
    cell = image_size + PADDING
    rows, cols = (figure.shape[1] - PADDING) // cell, (figure.shape[2] - PADDING) // cell
    _, ax = plt.subplots(figsize=(cols * cell_inches + 1.5, rows * cell_inches + 0.6))
    ax.imshow(figure.permute(1, 2, 0).numpy(), interpolation="nearest")
    centres = [PADDING + cell * k + image_size / 2 for k in range(max(rows, cols))]
    ax.set_xticks(centres[:cols], list(col_labels) if col_labels else [""] * cols)
    ax.set_yticks(centres[:rows], list(row_labels) if row_labels else [""] * rows)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, pad=20 if col_labels else 6)
    return ax
