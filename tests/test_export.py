"""scripts/export.py: (EMA) weights as safetensors + config YAML, loaded back by load_module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowerdiff.build import build_module, module_config
from flowerdiff.checkpoint import CheckpointError, load_config, load_module
from flowerdiff.export import export_checkpoint

from conftest import REPO_ROOT


@pytest.fixture
def checkpoint(tiny_config, tmp_path: Path) -> tuple[Path, dict]:
    """A checkpoint laid out as Lightning + EMAWeightAveraging write it: the EMA weights in
    ``state_dict``, the raw ones in ``current_model_state``."""
    cfg = tiny_config()
    torch.manual_seed(0)
    module = build_module(cfg)
    ema = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in module.state_dict().items()
    }
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": ema,
            "current_model_state": module.state_dict(),
            "flowerdiff_config": module_config(cfg),
            "global_step": 42,
            "epoch": 3,
        },
        path,
    )
    return path, ema


def test_round_trip_gives_the_same_samples(checkpoint, tmp_path: Path) -> None:
    path, ema = checkpoint
    out = export_checkpoint(path, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    original = load_module(path)
    for source in (out, out / "model.safetensors"):
        exported = load_module(source)
        for name, value in exported.net.state_dict().items():
            assert torch.equal(value, ema[f"net.{name}"]), name  # the EMA weights, exactly
        assert torch.equal(original.sample(2, seed=5).images, exported.sample(2, seed=5).images)
        assert exported.sampler.num_inference_steps == 4 and not exported.training


def test_config_yaml_describes_the_model_and_its_origin(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    config = yaml.safe_load((export_checkpoint(path, tmp_path / "e") / "config.yaml").read_text())
    assert config["model"]["net"]["hidden_dims"] == [16, 32, 32, 64]
    assert config["scheduler"]["name"] == "cosine_clipped"
    assert config["data"]["image_size"] == 16  # the whole node: evaluate.py's reference data
    assert config["export"]["ema_weights"] is True and config["export"]["global_step"] == 42


def test_lone_safetensors_file_and_edited_yaml(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    alone = tmp_path / "alone" / "weights.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((out / "model.safetensors").read_bytes())
    assert load_module(alone).sampler.num_inference_steps == 4  # config from the metadata
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["sampler"]["num_inference_steps"] = 2
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_module(out).sampler.num_inference_steps == 2  # the YAML beside it wins


def test_bad_exports_fail_with_clear_messages(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"Could not read .*model\.safetensors.* truncated"):
        load_module(out)
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors"):
        load_module(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"is not a flowerdiff export"):
        load_module(tmp_path / "other.safetensors")


def test_export_config_cannot_make_loading_run_code(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    victim = tmp_path / "written_by_config"
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["model"]["net"] = {
        "_target_": "flowerdiff.data.cache.atomic_torch_save",  # writes any file it is told to
        "obj": 1,
        "path": str(victim),
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"model\.net\._target_='flowerdiff\.data\.cache"):
        load_module(out)
    assert not victim.exists()


def test_load_config_reads_checkpoints_and_exports_and_refuses_foreign_targets(
    checkpoint, tmp_path: Path
) -> None:
    path, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    for source in (path, out, out / "model.safetensors"):
        assert load_config(source)["data"]["_target_"] == "flowerdiff.data.FlowersDataModule"
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["data"]["_target_"] = "builtins.print"
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"data\._target_='builtins\.print'"):
        load_config(out)


@pytest.mark.slow
def test_export_script(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    out = tmp_path / "cli"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "export.py"),
            f"ckpt_path={path}",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_module(out).sample(1, seed=0).images.isfinite().all()
