"""Explore a model in the browser: `python scripts/explore.py ckpt_path=last.ckpt` (a local web
app to sample, transform, inpaint and interpolate; needs the `explore` extra)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="explore")
def main(cfg: DictConfig) -> None:
    from flowerdiff.tasks.errors import exit_on_user_error
    from flowerdiff.tasks.explore import explore

    with exit_on_user_error():
        explore(cfg)


if __name__ == "__main__":
    main()
