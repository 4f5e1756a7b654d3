"""Every option of every config group composes and resolves in every entry config that uses
it, and the objects it names can be built: models on the meta device, every diffusion family
with every sampler, the book's recipe exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flowerdiff.diffusion import build_diffusion
from flowerdiff.diffusion.samplers import DDIMSampler
from flowerdiff.infra.config import model_spec, validate_train_config
from flowerdiff.training.module import DiffusionModule

from conftest import CONFIG_DIR, compose_config

# The groups each entry config (conf/<name>.yaml) chooses from.
ENTRY_GROUPS = {
    "train": [
        "data",
        "model",
        "diffusion",
        "diffusion/schedule",
        "sampler",
        "optimizer",
        "lr_scheduler",
        "callbacks",
        "logger",
        "trainer",
        "paths",
        "experiment",
        "hparams_search",
    ],
    "sample": ["sampler", "paths"],
    "evaluate": ["data", "sampler", "paths"],
    "export": ["paths"],
    "benchmark": ["model", "diffusion", "sampler", "optimizer", "lr_scheduler", "paths"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


CHOICES = [
    (entry, group, option)
    for entry, groups in ENTRY_GROUPS.items()
    for group in groups
    for option in options(group)
]


def resolve_everything(cfg) -> None:
    """Every interpolation outside Hydra's own node resolves (a typo in a ${...} fails here)."""
    for key, node in cfg.items():
        if key != "hydra" and OmegaConf.is_config(node):
            OmegaConf.to_container(node, resolve=True)


@pytest.mark.parametrize("entry", list(ENTRY_GROUPS))
def test_entry_config_composes_and_resolves_as_shipped(entry: str, tmp_path: Path) -> None:
    cfg = compose_config([f"paths.root_dir={tmp_path}"], config_name=entry, output_dir=tmp_path)
    resolve_everything(cfg)
    assert cfg.task_name == entry


@pytest.mark.parametrize(
    ("entry", "group", "option"), CHOICES, ids=[f"{e}:{g}={o}" for e, g, o in CHOICES]
)
def test_every_option_composes_and_resolves(
    entry: str, group: str, option: str, tmp_path: Path
) -> None:
    overrides = [f"{group}={option}", f"paths.root_dir={tmp_path}"]
    cfg = compose_config(overrides, config_name=entry, output_dir=tmp_path)
    if group not in ("experiment", "hparams_search"):  # @package _global_: no key of their own
        assert OmegaConf.select(cfg, group.replace("/", ".")) is not None
    resolve_everything(cfg)


def test_every_group_has_options_and_an_entry_config() -> None:
    used = {group for groups in ENTRY_GROUPS.values() for group in groups}
    for group in used:
        assert options(group), f"conf/{group}/ has no options"
    on_disk = {
        str(path.parent.relative_to(CONFIG_DIR))
        for path in CONFIG_DIR.rglob("*.yaml")
        if path.parent != CONFIG_DIR and not path.parent.is_relative_to(CONFIG_DIR / "hydra")
    }
    assert on_disk <= used, f"groups no entry config is tested with: {on_disk - used}"


@pytest.mark.parametrize("option", options("model"))
def test_models_build_on_meta(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"model={option}", "data.image_size=64"], output_dir=tmp_path)
    spec = model_spec(cfg)
    with torch.device("meta"):
        net = spec.build_network()
        out = net(torch.zeros(2, 3, 64, 64), torch.tensor([1, 2]))
    assert out.shape == (2, 3, 64, 64) and out.device.type == "meta"
    count = sum(p.numel() for p in net.parameters())
    expected = {
        "unet_133m": 133_417_219,  # the book's
        "unet_small": 33_600_643,
        "unet_tiny": 654_243,
        "unet_cpu": 2_979_715,
        "unet_64_fast": 67_108_739,
    }[option]
    assert count == expected


def test_every_schedule_builds(tmp_path: Path) -> None:
    for option in options("diffusion/schedule"):
        cfg = compose_config([f"diffusion/schedule={option}"], output_dir=tmp_path)
        diffusion = build_diffusion(
            OmegaConf.to_container(cfg.diffusion, resolve=True), {"name": "ddim"}
        )
        abar = diffusion.schedule.alphas_cumprod
        assert diffusion.schedule.name == option and abar.shape == (1000,)
        assert bool((abar[1:] < abar[:-1]).all()) and 0 < float(abar[-1]) < float(abar[0]) < 1


FAMILY_SAMPLERS = [(d, s) for d in options("diffusion") for s in options("sampler")]


@pytest.mark.parametrize(("family", "sampler"), FAMILY_SAMPLERS)
def test_every_diffusion_family_and_sampler_validate_and_sample(
    family: str, sampler: str, tiny_config
) -> None:
    # (tiny_config's sampler.num_inference_steps=4 applies to every sampler)
    spec = validate_train_config(tiny_config(f"diffusion={family}", f"sampler={sampler}"))
    # an option may be a preset of a family (ddpm_v is the DDPM family with v and min-SNR)
    assert (
        family.startswith(spec.diffusion["name"]) and spec.diffusion["sampler"]["name"] == sampler
    )
    module = DiffusionModule.from_spec(spec).eval()
    images = module.sample(2, seed=0).images
    assert images.shape == (2, 3, 16, 16) and bool(images.isfinite().all())


def test_book_command_line_is_valid(tmp_path: Path) -> None:
    cfg = compose_config(["model=unet_133m", "trainer.devices=4"], output_dir=tmp_path)
    assert cfg.trainer.devices == 4
    assert list(cfg.model.net.hidden_dims) == [128, 256, 512, 1024]


def test_book_experiment_matches_the_book(tmp_path: Path) -> None:
    cfg = compose_config(
        ["experiment=flowers64", f"paths.root_dir={tmp_path}"], output_dir=tmp_path / "run"
    )
    assert cfg.data.image_size == 64 and cfg.data.batch_size == 4
    assert cfg.trainer.max_epochs == 100
    assert cfg.callbacks.get("ema") is None  # the book has no EMA
    assert cfg.lr_scheduler.warmup_steps == 300
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.optimizer.lr == 1e-4 and list(cfg.optimizer.betas) == [0.95, 0.999]
    assert cfg.optimizer.weight_decay == 1e-5

    spec = validate_train_config(cfg)  # the built objects, not only the YAML
    diffusion = spec.build_diffusion()
    assert spec.diffusion["name"] == "ddpm" and diffusion.prediction == "epsilon"
    assert diffusion.schedule.name == "cosine_clipped" and diffusion.num_timesteps == 1000
    assert diffusion.regression.kind == "l1" and diffusion.regression.weighting == "none"
    sampler = diffusion.sampler
    assert isinstance(sampler, DDIMSampler)
    assert sampler.num_inference_steps == 50 and sampler.eta == 1.0
    plan = diffusion.plan(sampler)
    assert [level.t for level in plan.levels[:3]] == [980, 960, 940]  # "leading" spacing
    assert spec.image_shape == (3, 64, 64)
    with torch.device("meta"):
        net = spec.build_network()
    assert sum(p.numel() for p in net.parameters()) == 133_417_219
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.95, 0.999), 1e-5)
