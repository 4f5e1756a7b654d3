"""sample(cfg) / scripts/sample.py on a checkpoint written here: files, sizes, reproducibility."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowerdiff.build import build_module
from flowerdiff.diffusion import DDPMSampler
from flowerdiff.sample import configured_sampler, sample

from conftest import REPO_ROOT, compose_config


@pytest.fixture
def checkpoint(tiny_config, tmp_path: Path) -> Path:
    """A flowerdiff checkpoint as training writes it (config + state_dict), untrained weights."""
    module = build_module(tiny_config())
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "flowerdiff_config": module.config}, path)
    return path


def run_sample(checkpoint: Path, out_dir: Path, *overrides: str) -> dict:
    cfg = compose_config(
        [f"ckpt_path={checkpoint}", f"out_dir={out_dir}", "device=cpu", *overrides],
        config_name="sample",
        output_dir=out_dir,
    )
    return sample(cfg)


def pixels(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in paths]


def test_sample_writes_images_grid_strip_and_gif(checkpoint: Path, tmp_path: Path) -> None:
    common = ("num_images=5", "sampler=ddim", "steps=4", "eta=1.0", "trajectory_images=2")
    a = run_sample(checkpoint, tmp_path / "a", *common, "seed=3", "batch_size=2")
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == [
        f"{i:05d}.png" for i in range(5)
    ]
    assert all(Image.open(p).size == (16, 16) for p in a["images"])
    assert Image.open(a["grid"]).size == (2 + 2 * 18, 2 + 3 * 18)  # 5 images, 2 per row
    # 5 columns (t = 750, 500, 500, 250, 0 for 4 steps), 2 samples x (x_t, x0) rows
    assert Image.open(a["trajectory"]).size == (2 + 5 * 18, 2 + 4 * 18)
    gif = Image.open(a["gif"])
    assert gif.n_frames == 4 and gif.size == (2 + 2 * 18, 2 + 2 * 18)

    # Same seed, other batch split: the same images; another seed: other images.
    b = run_sample(checkpoint, tmp_path / "b", *common, "seed=3", "batch_size=5")
    c = run_sample(checkpoint, tmp_path / "c", *common, "seed=4", "batch_size=5")
    for x, y, z in zip(pixels(a["images"]), pixels(b["images"]), pixels(c["images"]), strict=True):
        assert np.array_equal(x, y)
        assert not np.array_equal(x, z)


def test_steps_and_eta_shortcuts(checkpoint: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        [f"ckpt_path={checkpoint}", "sampler=ddim", "steps=7", "eta=0.0"],
        config_name="sample",
        output_dir=tmp_path,
    )
    module = build_module(compose_config(["model=unet_tiny", "data.image_size=16"]))
    sampler = configured_sampler(cfg, module)
    assert (sampler.num_inference_steps, sampler.eta) == (7, 0.0)
    module.sampler = DDPMSampler(10)
    cfg.sampler = None
    with pytest.raises(ValueError, match="eta"):
        configured_sampler(cfg, module)


@pytest.mark.slow
def test_sample_script_command_line(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "sample.py"), f"ckpt_path={checkpoint}"]
    command += ["num_images=3", "sampler=ddim", "steps=3", "eta=0.5", "seed=1", f"out_dir={out}"]
    env = {**os.environ, "FLOWERDIFF_ROOT": str(tmp_path)}  # Hydra's log dir under tmp_path
    subprocess.run(command, check=True, cwd=tmp_path, env=env, timeout=300, capture_output=True)
    assert len(list((out / "images").glob("*.png"))) == 3
    assert {p.name for p in out.iterdir()} >= {"grid.png", "trajectory.png", "trajectory.gif"}
