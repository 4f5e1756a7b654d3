"""Export a checkpoint: `python scripts/export.py ckpt_path=last.ckpt out_dir=exports/run1`."""

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from flowerdiff.tasks.errors import exit_on_user_error
    from flowerdiff.tasks.export import export

    with exit_on_user_error():
        out_dir = export(cfg)
    log.info("Exported %s to %s (model.safetensors + config.yaml)", cfg.ckpt_path, out_dir)


if __name__ == "__main__":
    main()
