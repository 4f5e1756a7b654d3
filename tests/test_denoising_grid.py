"""DenoisingGridCallback and the trajectory figure: the book's columns, EDM's sigma captions,
the forward-diffusion grid, the per-class grid, PNGs with any logger or none, EMA weights."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging
from PIL import Image

from flowerdiff.callbacks import DenoisingGridCallback
from flowerdiff.callbacks import denoising_grid as grid_module
from flowerdiff.diffusion import build_diffusion
from flowerdiff.diffusion.analytic import GaussianMixtureOracle
from flowerdiff.infra.config import build_module
from flowerdiff.tasks.notebook import analytic_module
from flowerdiff.tasks.train import train
from flowerdiff.training.module import DiffusionModule
from flowerdiff.training.spec import ModelSpec
from flowerdiff.viz.figures import to_unit, trajectory_figure, trajectory_steps

from conftest import write_images

SIZE = 8
CELL = SIZE + 2  # image plus the grid's 2-pixel padding


def oracle(diffusion: dict, sampler: dict) -> DiffusionModule:
    """The exact Gaussian denoiser of a few random images: samples like a trained model."""
    images = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return analytic_module(images, build_diffusion(diffusion, sampler))


def fake_trainer(tmp_path: Path, callbacks: list | None = None) -> Any:
    """What the callback reads of a trainer, on rank zero, outside sanity checking."""
    return SimpleNamespace(
        is_global_zero=True,
        sanity_checking=False,
        current_epoch=0,
        global_step=7,
        default_root_dir=str(tmp_path),
        loggers=[],
        callbacks=callbacks or [],
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
    )


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[torch.Tensor, str | None, Path]]:
    """Every figure the callback logs, by key: (image, caption, PNG path)."""
    figures: dict[str, tuple[torch.Tensor, str | None, Path]] = {}
    original = grid_module.log_image

    def record(trainer: Any, key: str, image: torch.Tensor, caption: str | None = None) -> Path:
        path = original(trainer, key, image, caption=caption)
        figures[key] = (image, caption, path)
        return path

    monkeypatch.setattr(grid_module, "log_image", record)
    return figures


# -- the trajectory figure ------------------------------------------------------------------
def test_trajectory_columns_are_the_books_timesteps() -> None:
    module = oracle({"name": "ddpm"}, {"name": "ddim", "num_inference_steps": 50})  # leading
    out = module.sample(3, seed=0, return_intermediates=True)
    assert [level.t for level in out.levels[:2]] == [980, 960]
    steps = trajectory_steps(module.diffusion, out, 5)
    assert [out.levels[i].t for i in steps] == [800, 600, 400, 200, 0]
    assert [out.levels[i].t for i in trajectory_steps(module.diffusion, out, 2)] == [500, 0]
    with pytest.raises(ValueError, match="columns=0"):
        trajectory_steps(module.diffusion, out, 0)

    figure = trajectory_figure(module.diffusion, out, num_images=2, columns=5)
    assert figure.caption == "t=800, t=600, t=400, t=200, t=0 (x / predicted x0 rows)"
    # 2 samples x (x, predicted x0) rows, 5 columns; the last x column is the final sample.
    assert figure.image.shape == (3, 4 * CELL + 2, 5 * CELL + 2)
    last = figure.image[:, 2 : 2 + SIZE, 4 * CELL + 2 : 5 * CELL]
    torch.testing.assert_close(last, to_unit(out.images[0]))
    second_x0 = figure.image[:, 3 * CELL + 2 : 4 * CELL, 2 : 2 + SIZE]  # sample 1's x0 at t=800
    torch.testing.assert_close(second_x0, to_unit(out.pred_x0[steps[0]][1]))
    plain = trajectory_figure(module.diffusion, out, num_images=3, columns=5, show_pred_x0=False)
    assert plain.image.shape == (3, 3 * CELL + 2, 5 * CELL + 2)
    assert plain.caption.endswith("(x rows)")


def test_edm_trajectory_is_captioned_with_sigma() -> None:
    module = oracle({"name": "edm"}, {"name": "heun", "num_inference_steps": 18})
    out = module.sample(2, seed=0, return_intermediates=True)
    steps = trajectory_steps(module.diffusion, out, 5)
    progress = [module.diffusion.progress(out.levels[i]) for i in steps]
    # Karras grid positions i/17: each column is the visited level nearest its target.
    for shown, target in zip(progress, (0.2, 0.4, 0.6, 0.8, 1.0), strict=True):
        assert abs(shown - target) <= 0.5 / 17 + 1e-9
    caption = trajectory_figure(module.diffusion, out, 2, 5).caption
    labels = caption.split(" (")[0].split(", ")
    assert len(labels) == 5 and all(label.startswith("σ=") for label in labels)
    assert labels[-1] == "σ=0.002"  # sigma_min: the last step ends on the sample
    assert float(labels[0][2:]) > float(labels[1][2:]) > float(labels[-1][2:])


# -- the callback's figures -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "first", "last"),
    [("ddpm", "t=0", "t=999"), ("edm", "σ=0.002", "σ=80")],
)
def test_forward_diffusion_grid_columns(
    tmp_path: Path, logged: dict, family: str, first: str, last: str
) -> None:
    sampler = {"name": "ddim" if family == "ddpm" else "heun"}
    module = oracle({"name": family}, sampler)
    callback = DenoisingGridCallback(forward_images=2, forward_columns=6)
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    callback.maybe_log_forward(fake_trainer(tmp_path), module, (images, torch.arange(3)))
    image, caption, path = logged["samples/forward_diffusion"]
    columns = caption.split(", ")
    assert len(columns) == 6 and (columns[0], columns[-1]) == (first, last)
    if family == "ddpm":
        assert columns == ["t=0", "t=200", "t=400", "t=600", "t=800", "t=999"]
    # 2 real images (rows) noised to 6 levels (columns), clean on the left.
    assert image.shape == (3, 2 * CELL + 2, 6 * CELL + 2)
    assert Image.open(path).size == (6 * CELL + 2, 2 * CELL + 2)
    clean = image[:, CELL + 2 : 2 * CELL, 2 : 2 + SIZE]  # row 1, column 0
    torch.testing.assert_close(clean, to_unit(images[1]), atol=0.02, rtol=0)
    noisy = image[:, 2 : 2 + SIZE, 5 * CELL + 2 : 6 * CELL]
    assert (noisy - to_unit(images[0])).abs().mean() > 0.2  # little of the image is left
    logged.clear()
    callback.maybe_log_forward(fake_trainer(tmp_path), module, (images, torch.arange(3)))
    assert logged == {}  # once per fit


def test_unconditional_grid_and_trajectory(tmp_path: Path, logged: dict) -> None:
    module = oracle({"name": "ddpm"}, {"name": "ddim", "num_inference_steps": 50})
    callback = DenoisingGridCallback(num_images=4, trajectory_images=2, forward_images=0)
    callback.log_samples(fake_trainer(tmp_path), module)
    assert set(logged) == {"samples/grid", "samples/trajectory"}
    grid, _, path = logged["samples/grid"]
    assert path == tmp_path / "images" / "samples" / "grid" / "step_0000007.png"
    assert grid.shape == (3, 2 * CELL + 2, 2 * CELL + 2)
    expected = module.sample(4, seed=0).images  # the fixed noise of seed 0
    torch.testing.assert_close(grid[:, 2 : 2 + SIZE, CELL + 2 : 2 * CELL], to_unit(expected[1]))
    assert logged["samples/trajectory"][1].startswith("t=800, t=600, t=400, t=200, t=0")
    assert callback.last_step == 7


def mixture_module(names: tuple[str, ...] | None) -> DiffusionModule:
    """Three classes of flat images with means -0.6, 0 and 0.6 and std 0.05: a row of the
    per-class grid shows which class it was sampled from."""
    means = torch.tensor([-0.6, 0.0, 0.6]).reshape(3, 1, 1, 1).expand(3, 3, SIZE, SIZE)
    diffusion = build_diffusion({"name": "ddpm"}, {"name": "ddim", "num_inference_steps": 10})
    net = GaussianMixtureOracle(means, torch.full_like(means, 0.05), diffusion)
    spec = ModelSpec({"name": "unet"}, diffusion.to_config(), (3, SIZE, SIZE), names)
    return DiffusionModule(net, diffusion, (3, SIZE, SIZE), spec).eval()


@pytest.mark.parametrize("names", [("rose", "iris", "daisy"), None], ids=["names", "no-names"])
def test_per_class_grid_rows_are_the_classes(
    tmp_path: Path, logged: dict, names: tuple[str, ...] | None
) -> None:
    module = mixture_module(names)
    callback = DenoisingGridCallback(
        num_images=2, trajectory_images=1, forward_images=0, classes=[2, 0], guidance_scale=2.0
    )
    trainer = fake_trainer(tmp_path, [callback])
    callback.setup(trainer, module, "fit")
    callback.log_samples(trainer, module)
    assert "samples/grid" not in logged
    image, caption, path = logged["samples/per_class"]
    rows = ["daisy", "rose"] if names else ["class 2", "class 0"]
    assert caption == f"rows: {', '.join(rows)} (guidance 2)"
    assert path.parent.name == "per_class" and Image.open(path).size[1] == 2 * CELL + 2
    # Class names are written in a margin left of the 2 x 2 grid.
    width = 2 * CELL + 2
    assert image.shape[2] > width and image[:, :, : image.shape[2] - width].min() < 0.5
    cells = image[:, :, image.shape[2] - width :]
    for row, mean in enumerate((0.6, -0.6)):  # daisy (class 2), then rose (class 0)
        for column in range(2):
            cell = cells[
                :, 2 + row * CELL : (row + 1) * CELL, 2 + column * CELL : (column + 1) * CELL
            ]
            assert cell.mean().item() == pytest.approx((mean + 1) / 2, abs=0.05)
    assert "samples/trajectory" in logged


def test_per_class_grid_classes_default_and_checked(tmp_path: Path) -> None:
    callback = DenoisingGridCallback()
    assert callback.grid_classes(3) == [0, 1, 2]
    spread = callback.grid_classes(102)
    assert len(spread) == 8 and spread[0] == 0 and spread[-1] == 101 and spread == sorted(spread)
    module = mixture_module(None)
    for classes in ([0, 3], []):
        bad = DenoisingGridCallback(classes=classes)
        with pytest.raises(ValueError, match=r"callbacks\.denoising_grid\.classes=.*\[0, 3\)"):
            bad.setup(fake_trainer(tmp_path, [bad]), module, "fit")


def test_bad_sizes_are_rejected_naming_the_callback() -> None:
    with pytest.raises(ValueError, match=r"callbacks\.denoising_grid.*forward_columns=1"):
        DenoisingGridCallback(forward_columns=1)
    with pytest.raises(ValueError, match=r"num_inference_steps=0"):
        DenoisingGridCallback(num_inference_steps=0)


# -- in a real fit ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", None])
def test_grid_callback_writes_pngs_with_csv_and_without_logger(
    tiny_config, tmp_path: Path, logger: str | None
) -> None:
    # LearningRateMonitor refuses to run without a logger.
    cfg = tiny_config(*([f"logger={logger}"] if logger else ["~logger", "~callbacks.lr_monitor"]))
    assert bool(cfg.get("logger")) == bool(logger)
    train(cfg)
    images = tmp_path / "run" / "images" / "samples"
    found = {p.relative_to(images).as_posix(): Image.open(p).size for p in images.rglob("*.png")}
    # every_n_epochs=5 > 1 epoch: the samples come from the end of training (step 3, EMA
    # weights), the forward grid from the first (sanity-check) validation batch.
    assert found == {
        "forward_diffusion/step_0000000.png": (110, 38),
        "grid/step_0000003.png": (38, 38),
        "trajectory/step_0000003.png": (92, 74),
    }
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file() == (logger == "csv")


@pytest.mark.slow
@pytest.mark.parametrize("grid_first", [True, False])
def test_samples_are_drawn_with_the_ema_weights(
    tiny_config, tmp_path: Path, grid_first: bool
) -> None:
    """Whatever the callback order, the weights at sampling time are EMA's average."""
    cfg = tiny_config()
    seen: list[bool] = []
    ema = EMAWeightAveraging(decay=0.5)

    def flat(module: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in module.parameters()])

    class Spy(DenoisingGridCallback):
        def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # Before EMA's swap: the averaged copy Lightning keeps, and the training weights.
            self.snapshot = flat(ema._average_model.module.net), flat(pl_module.net)

        def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            averaged, trained = self.snapshot
            assert not torch.equal(averaged, trained)  # decay 0.5: they differ, the test can fail
            seen.append(torch.equal(flat(pl_module.net), averaged))

    spy = Spy(every_n_epochs=1, forward_images=0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spy, ema] if grid_first else [ema, spy],
    )
    trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))
    # At the validation always; again at the end of training (the spy never records a step)
    # only when EMA comes first, since only then has EMA copied its weights in by then.
    assert seen == ([True] if grid_first else [True, True])


@pytest.mark.slow
def test_conditional_run_logs_a_per_class_grid_with_class_names(
    tiny_config, tmp_path: Path
) -> None:
    """data.labels from class sub-folders, names from data.class_names: the names reach the
    checkpoint's spec and the per-class grid."""
    root = tmp_path / "classes"
    for k, name in enumerate(("daisy", "iris")):
        write_images(root / name, count=8, size=16, seed=k)
    names = tmp_path / "names.txt"
    names.write_text("common daisy\nyellow iris\n")
    cfg = tiny_config(
        f"data.root={root}",
        "data.labels=true",
        f"data.class_names={names}",
        "model.net.num_classes=2",
        "callbacks.denoising_grid.num_images=2",
        "callbacks.denoising_grid.trajectory_images=1",
    )
    train(cfg)
    folder = tmp_path / "run" / "images" / "samples"
    (per_class,) = (folder / "per_class").glob("*.png")
    assert not (folder / "grid").exists()
    width, height = Image.open(per_class).size
    assert height == 2 * 18 + 2 and width > 2 * 18 + 2  # 2 classes x 2 images, names left
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["flowerdiff"]["class_names"] == ["common daisy", "yellow iris"]
    assert checkpoint["flowerdiff"]["network"]["num_classes"] == 2
