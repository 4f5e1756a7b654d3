"""Sample a checkpoint: `python scripts/sample.py ckpt_path=last.ckpt num_images=64 steps=50`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from flowerdiff.tasks.errors import exit_on_user_error
    from flowerdiff.tasks.sample import sample

    with exit_on_user_error():
        sample(cfg)


if __name__ == "__main__":
    main()
