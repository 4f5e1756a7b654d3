"""Benchmark training and sampling speed: `python scripts/benchmark.py model=unet_small batch_size=8`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLOWERDIFF_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from flowerdiff.tasks.benchmark import run_benchmark
    from flowerdiff.tasks.errors import exit_on_user_error

    with exit_on_user_error():
        run_benchmark(cfg)


if __name__ == "__main__":
    main()
