"""Every option of every config group composes, and the objects it names can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_config

GROUPS = [
    "data",
    "model",
    "scheduler",
    "sampler",
    "optimizer",
    "lr_scheduler",
    "callbacks",
    "logger",
    "trainer",
    "paths",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


ALL_CHOICES = [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize(("group", "option"), ALL_CHOICES, ids=[f"{g}={o}" for g, o in ALL_CHOICES])
def test_every_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"{group}={option}", f"paths.root_dir={tmp_path}"], output_dir=tmp_path)
    if group != "experiment":  # experiments are @package _global_: no key of their own
        assert cfg[group] is not None
    # Every interpolation outside Hydra's own node resolves (a typo in a ${...} fails here).
    for key, node in cfg.items():
        if key != "hydra" and OmegaConf.is_config(node):
            OmegaConf.to_container(node, resolve=True)


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("option", options("scheduler"))
def test_schedules_instantiate(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"scheduler={option}"], output_dir=tmp_path)
    schedule = instantiate(cfg.scheduler)
    assert schedule.alphas_cumprod.shape == (cfg.scheduler.num_timesteps,)


@pytest.mark.parametrize("option", options("sampler"))
def test_samplers_instantiate(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"sampler={option}"], output_dir=tmp_path)
    sampler = instantiate(cfg.sampler)
    assert len(sampler.timesteps(1000)) == cfg.sampler.num_inference_steps


@pytest.mark.parametrize("option", options("model"))
def test_models_instantiate_on_meta(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"model={option}"], output_dir=tmp_path)
    with torch.device("meta"):
        net = instantiate(cfg.model.net)
        out = net(torch.zeros(2, 3, 64, 64), torch.tensor([1, 2]))
    assert out.shape == (2, 3, 64, 64)
    instantiate(cfg.model.loss)


def test_book_command_line_is_valid(tmp_path: Path) -> None:
    cfg = compose_config(["model=unet_133m", "trainer.devices=4"], output_dir=tmp_path)
    assert cfg.trainer.devices == 4
    assert list(cfg.model.net.hidden_dims) == [128, 256, 512, 1024]


def test_book_experiment_matches_the_book(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=flowers64"], output_dir=tmp_path)
    assert cfg.model.loss.kind == "l1" and cfg.model.prediction == "epsilon"
    assert cfg.scheduler.name == "cosine_clipped"
    assert cfg.sampler.num_inference_steps == 50 and cfg.sampler.eta == 1.0
    assert cfg.optimizer.lr == 1e-4 and list(cfg.optimizer.betas) == [0.95, 0.999]
    assert cfg.optimizer.weight_decay == 1e-5
    assert cfg.data.image_size == 64 and cfg.data.batch_size == 4
    assert cfg.lr_scheduler.warmup_steps == 300
    assert cfg.callbacks.get("ema") is None
