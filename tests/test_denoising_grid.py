"""DenoisingGridCallback: PNGs in the run dir with any logger or none, EMA weights, the layout."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging
from PIL import Image

from flowerdiff.build import build_module
from flowerdiff.callbacks import DenoisingGridCallback
from flowerdiff.diffusion import DDIMSampler
from flowerdiff.images import nearest_steps, trajectory_grid, trajectory_targets
from flowerdiff.train import train


def test_trajectory_columns_are_the_books_timesteps() -> None:
    targets = trajectory_targets(1000, 5)
    assert targets == [800, 600, 400, 200, 0]
    timesteps = DDIMSampler(50).timesteps(1000)  # 980, 960, ..., 0
    assert [timesteps[i] for i in nearest_steps(timesteps, targets)] == targets
    assert trajectory_targets(1000, 2) == [500, 0]
    with pytest.raises(ValueError, match="columns"):
        trajectory_targets(1000, 0)


def test_trajectory_grid_layout() -> None:
    steps = [torch.full((3, 3, 8, 8), float(i) / 10) for i in range(10)]
    figure = trajectory_grid(steps, steps, [2, 5, 9], padding=2)
    assert figure.shape == (3, 6 * 10 + 2, 3 * 10 + 2)  # 3 samples x (x_t, x0) rows, 3 columns
    assert trajectory_grid(steps, None, [2, 5, 9]).shape == (3, 3 * 10 + 2, 3 * 10 + 2)


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
    seen: list[torch.Tensor] = []
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
