"""Race flowerdiff against diffusers' training script at equal wall clock: `python scripts/race.py`.

Both sides train on the same data, image size, device and budget (default: 20 minutes each,
side by side, one thread each); FID/KID of their EMA snapshots are printed as a table and
written to race.json and race.png in the run directory. Options: conf/race.yaml.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="race")
def main(cfg: DictConfig) -> None:
    from flowerdiff.tasks.errors import exit_on_user_error
    from flowerdiff.tasks.race import run_race

    with exit_on_user_error():
        run_race(cfg)


if __name__ == "__main__":
    main()
