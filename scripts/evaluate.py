"""FID/KID of a checkpoint or an image folder: `python scripts/evaluate.py ckpt_path=last.ckpt`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    from flowerdiff.errors import exit_on_user_error
    from flowerdiff.evaluate import evaluate

    with exit_on_user_error():
        return evaluate(cfg)["fid"]


if __name__ == "__main__":
    main()
