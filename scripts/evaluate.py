"""FID/KID of a checkpoint or an image folder: `python scripts/evaluate.py ckpt_path=last.ckpt`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    from flowerdiff.tasks.errors import exit_on_user_error
    from flowerdiff.tasks.evaluate import evaluate

    with exit_on_user_error():
        result = evaluate(cfg)
    # A sweeper's objective; a guidance sweep (guidance_scale=[...]) returns its best FID.
    runs = result.get("guidance_sweep", [result])
    return min(run["fid"] for run in runs)


if __name__ == "__main__":
    main()
