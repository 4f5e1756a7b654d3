"""The notebooks run top to bottom on a CPU at the tiny size, and are committed without outputs.

Each notebook runs in a fresh Jupyter kernel of *this* interpreter (the venv's), through a
kernelspec written for the session, so a user-level ``python3`` kernel of another Python can never
be picked up instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from flowerdiff.data import DataSourceError
from flowerdiff.demo import ImageSource, find_images, notebook_size, write_flower_images

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_forward_diffusion.ipynb", "02_train_and_sample.ipynb", "03_samplers.ipynb")
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


# -- helpers the notebooks share (flowerdiff.demo) --------------------------------------------
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
    assert find_images("full") == ImageSource("folder", folder.resolve(), "$FLOWERDIFF_DATA")


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
@pytest.mark.parametrize(
    ("name", "num_figures", "expected_text"),
    [
        ("01_forward_diffusion.ipynb", 4, "cosine_clipped"),
        ("03_samplers.ipynb", 3, "exact Gaussian denoiser fitted to 32 images"),
    ],
)
def test_notebook_runs(
    name: str, num_figures: int, expected_text: str, kernel_name: str, notebook_env: Path
) -> None:
    notebook = run_notebook(name, kernel_name)
    assert figures(notebook) == num_figures
    assert expected_text in printed(notebook)


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
    assert f"trained model from {checkpoint}" in printed(notebook)
