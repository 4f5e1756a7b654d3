"""The notebooks run top to bottom on a CPU at the tiny size, and are committed without outputs.

Each notebook runs in a fresh Jupyter kernel of *this* interpreter (the venv's), through a
kernelspec written for the session, so a user-level ``python3`` kernel of another Python can never
be picked up instead.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from flowerdiff.data import DataSourceError
from flowerdiff.tasks.notebook import DemoImages, find_images, notebook_size, write_flower_images

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_forward_diffusion.ipynb",
    "02_train_and_sample.ipynb",
    "03_samplers.ipynb",
    "04_class_conditional.ipynb",
    "05_editing.ipynb",
)
KERNEL_NAME = "flowerdiff-tests"


def test_notebook_folder_holds_exactly_the_documented_notebooks() -> None:
    assert sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"notebooks/{name}: code cells {dirty} hold outputs or execution counts. Commit notebooks "
        "without outputs (Jupyter: Edit > Clear Outputs of All Cells, then save)."
    )
    assert "widgets" not in notebook.metadata, f"notebooks/{name} holds saved widget state"


# -- helpers the notebooks share (flowerdiff.tasks.notebook) --------------------------------------------
def test_notebook_size_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWERDIFF_NB_SIZE", raising=False)
    assert notebook_size() == "full"
    monkeypatch.setenv("FLOWERDIFF_NB_SIZE", " Tiny ")
    assert notebook_size() == "tiny"
    monkeypatch.setenv("FLOWERDIFF_NB_SIZE", "small")
    with pytest.raises(ValueError, match=r"FLOWERDIFF_NB_SIZE='small'.*'tiny'.*'full'"):
        notebook_size()


def test_find_images_falls_back_to_synthetic_flowers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A checkout with no shared data folder next to it, and no $FLOWERDIFF_DATA."""
    checkout = tmp_path / "checkout"
    (checkout / "conf").mkdir(parents=True)
    (checkout / "conf" / "train.yaml").touch()
    monkeypatch.setenv("FLOWERDIFF_ROOT", str(checkout))
    monkeypatch.setenv("FLOWERDIFF_NB_OUTPUT", str(tmp_path / "out"))
    monkeypatch.delenv("FLOWERDIFF_DATA", raising=False)
    source = find_images("tiny")
    assert source.source == "folder" and source.root.is_relative_to(tmp_path / "out")
    assert source.overrides() == ["data=folder", f"data.root={source.root}"]
    images = source.load(16, max_images=5)
    assert images.shape == (5, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1


def test_find_images_prefers_flowerdiff_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLOWERDIFF_DATA", str(tmp_path))
    with pytest.raises(DataSourceError, match="holds no image files"):
        find_images("tiny")
    folder = write_flower_images(tmp_path / "mine", count=2, size=8)
    monkeypatch.setenv("FLOWERDIFF_DATA", str(folder))
    assert find_images("full") == DemoImages("folder", folder.resolve(), "$FLOWERDIFF_DATA")


# -- the notebooks themselves -------------------------------------------------------------------
@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec that starts this interpreter, first on Jupyter's search path."""
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "flowerdiff tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_dir))
        yield KERNEL_NAME


@pytest.fixture
def notebook_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The tiny size, outputs under ``tmp_path``; the notebooks find the repository and the
    images themselves (the shared flowers when present, else synthetic ones)."""
    monkeypatch.setenv("FLOWERDIFF_NB_SIZE", "tiny")
    monkeypatch.setenv("FLOWERDIFF_NB_OUTPUT", str(tmp_path))
    # One thread: tiny models gain nothing from two, and on a busy 2-core machine OpenMP's
    # spinning threads make them ~50x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("FLOWERDIFF_DATA", "FLOWERDIFF_CKPT", "FLOWERDIFF_ROOT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def run_notebook(name: str, kernel_name: str) -> nbformat.NotebookNode:
    """Execute a notebook in ``notebooks/`` (its working directory, as in Jupyter)."""
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=300,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    return notebook


def figures(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )


@pytest.mark.slow
def test_forward_diffusion_notebook(kernel_name: str, notebook_env: Path) -> None:
    notebook = run_notebook("01_forward_diffusion.ipynb", kernel_name)
    assert figures(notebook) == 5  # data, schedules, book, VP vs VE, curves
    text = printed(notebook)
    assert "refused: `diffusion.schedule.zero_terminal_snr=true`" in text
    for name in ("cosine_clipped", "linear, zero terminal SNR", "sigmoid"):
        assert f"\n{name} " in text, name  # a row of the table
    # The book's x_t and EDM's x at the same noise level are one image up to a scale.
    (difference,) = re.findall(r"largest pixel difference between the two rows: (\S+)", text)
    assert float(difference) < 1e-5


SAMPLER_ROWS = ("DDPM", "DDIM eta=1", "DDIM eta=0", "DPM-Solver++(2M)", "Heun")


def frechet_rows(text: str) -> dict[str, list[float]]:
    """The notebook's table: sampler name, then its pixel Fréchet distance per step count."""
    rows = {}
    for line in text.splitlines():
        name, values = line[:18].strip(), line[18:].split()
        if name and values and all(re.fullmatch(r"\d\.\d\de[-+]\d+", v) for v in values):
            rows[name] = [float(v) for v in values]
    return rows


@pytest.mark.slow
def test_samplers_notebook_on_the_exact_model(kernel_name: str, notebook_env: Path) -> None:
    notebook = run_notebook("03_samplers.ipynb", kernel_name)
    assert figures(notebook) == 3  # moments, curves, first samples
    text = printed(notebook)
    assert "exact Gaussian denoiser fitted to 32 images" in text
    rows = frechet_rows(text)
    assert set(rows) == {*SAMPLER_ROWS, "EDM Euler", "EDM Heun", "reference", "EDM reference"}
    assert rows["DDPM"] == rows["DDIM eta=1"]  # unclipped, the same process and noise
    for name in ("DPM-Solver++(2M)", "Heun", "EDM Heun"):
        assert rows[name][-1] < rows[name][0], name  # more steps, closer to the data


@pytest.mark.slow
def test_train_notebook_then_samplers_on_its_checkpoint(
    kernel_name: str, notebook_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook = run_notebook("02_train_and_sample.ipynb", kernel_name)
    assert figures(notebook) == 4  # loss, trajectory, sample grid, reloaded grid
    (checkpoint,) = notebook_env.glob("notebook_train/runs/*/checkpoints/last.ckpt")
    assert f"FLOWERDIFF_CKPT={checkpoint}" in printed(notebook)
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3

    monkeypatch.setenv("FLOWERDIFF_CKPT", str(checkpoint))
    notebook = run_notebook("03_samplers.ipynb", kernel_name)
    assert figures(notebook) == 3
    text = printed(notebook)
    assert f"trained model from {checkpoint}" in text
    assert set(frechet_rows(text)) == {*SAMPLER_ROWS, "reference"}  # no EDM oracle here


def oracle_rows(text: str) -> dict[float, dict[str, float]]:
    """Notebook 04's exact-model table: per guidance scale, colour FD, accuracy, precision,
    recall."""
    rows = {}
    for line in text.split("w      colour FD   accuracy  precision  recall\n", 1)[1].splitlines():
        values = line.split()
        if len(values) != 5:
            break
        scale, *numbers = (float(v) for v in values)
        rows[scale] = dict(zip(("fd", "accuracy", "precision", "recall"), numbers, strict=True))
    return rows


@pytest.mark.slow
def test_class_conditional_notebook(kernel_name: str, notebook_env: Path) -> None:
    notebook = run_notebook("04_class_conditional.ipynb", kernel_name)
    # training images, a grid per guidance scale (4), the model's trade-off, the exact model's
    # colours and its trade-off
    assert figures(notebook) == 8
    (checkpoint,) = notebook_env.glob("notebook_conditional/runs/*/checkpoints/last.ckpt")
    spec = torch.load(checkpoint, weights_only=True)["flowerdiff"]
    assert spec["network"]["num_classes"] == 4 and len(spec["class_names"]) == 4
    rows = oracle_rows(printed(notebook))
    assert set(rows) == {0.0, 1.0, 2.0, 4.0}
    # The exact model: w = 1 is the data (smallest distance); more guidance, more adherence
    # and less diversity; w = 0 ignores the label. (Measured on the shared flowers / on the
    # synthetic fallback: accuracy 0.25 / 0.26, 0.75 / 1.00, 0.98 / 1.00 at w = 0, 1, 4;
    # recall 0.94 / 0.63 at w = 1, 0.39 / 0.22 at w = 4.)
    assert min(rows, key=lambda w: rows[w]["fd"]) == 1.0
    assert rows[0.0]["accuracy"] < 0.5 < rows[1.0]["accuracy"] <= rows[4.0]["accuracy"]
    assert rows[4.0]["recall"] < rows[2.0]["recall"] < rows[1.0]["recall"] - 0.1


@pytest.mark.slow
def test_editing_notebook(kernel_name: str, notebook_env: Path) -> None:
    """The three operations on a model trained in the notebook (tiny size), with their checks
    printed: strength 0 is the identity, inpainting keeps the known pixels, the seed
    interpolation's first frame is seed 0's image, and the inversion round trip is small."""
    notebook = run_notebook("05_editing.ipynb", kernel_name)
    assert figures(notebook) == 5
    text = printed(notebook)
    assert "strength 0 keeps the input: max |difference| = 0.0e+00" in text
    assert "inpainting keeps the known pixels: True" in text
    assert "first frame = seed 0's image: True" in text
    assert re.search(r"inversion round trip with \w+: RMS error \d\.\d{3}", text)
    (checkpoint,) = notebook_env.glob("notebook_editing/runs/*/checkpoints/last.ckpt")
    assert f"python scripts/explore.py ckpt_path={checkpoint}" in text
