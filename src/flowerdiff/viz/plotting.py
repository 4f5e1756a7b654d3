"""Matplotlib views of model-space images for the notebooks, with labelled rows and columns.

The grids themselves come from :mod:`flowerdiff.viz.figures` (the same ones the callbacks log), so a
notebook figure and a dashboard figure show the same thing; this module only adds the axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from torch import Tensor

from flowerdiff.diffusion import Diffusion, SamplerOutput
from flowerdiff.viz.figures import grid, trajectory_figure, trajectory_steps

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
    diffusion: Diffusion,
    num_images: int = 2,
    columns: int = 5,
    show_pred_x0: bool = True,
    title: str | None = None,
    cell_inches: float = 1.0,
) -> Axes:
    """The denoising trajectory of ``out`` (sampled with ``return_intermediates=True``): one
    row of x per image (and one of the predicted x0), columns at the visited levels nearest
    ``columns`` targets evenly spaced from noise to data (the book's DDIM-50 and 5 columns:
    t = 800, 600, 400, 200, 0)."""
    figure = trajectory_figure(diffusion, out, num_images, columns, show_pred_x0, PADDING)
    per_image = ["x", "predicted x0"] if show_pred_x0 else ["x"]
    rows = [f"{label} #{k}" for k in range(min(num_images, len(out.images))) for label in per_image]
    cols = [out.labels[i] for i in trajectory_steps(diffusion, out, columns)]
    return _show(figure.image, out.images.shape[-1], rows, cols, title, cell_inches)


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
