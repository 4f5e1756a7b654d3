"""Train a diffusion U-Net: `python scripts/train.py model=unet_133m trainer.devices=4`.

Sweeps: `python scripts/train.py -m optimizer.lr=1e-4,3e-4` or `hparams_search=flowers_optuna`.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the optimized metric for sweepers; a failed multirun job returns None."""
    from flowerdiff.infra.rundir import run_directory_lock
    from flowerdiff.tasks.errors import exit_on_user_error
    from flowerdiff.tasks.sweep import run_task
    from flowerdiff.tasks.train import train

    with exit_on_user_error(), run_directory_lock(cfg.paths.output_dir):
        return run_task(train, cfg)


if __name__ == "__main__":
    main()
