"""scripts/evaluate.py's logic: FID/KID of a checkpoint's samples and of an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from flowerdiff.build import build_module
from flowerdiff.evaluate import evaluate

from conftest import TINY_OVERRIDES, compose_config


def evaluate_config(tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = compose_config(
        [
            f"paths.root_dir={tmp_path}",
            f"fid.cache_dir={tmp_path / 'fid-cache'}",
            "device=cpu",
            "batch_size=4",
            *overrides,
        ],
        config_name="evaluate",
        output_dir=tmp_path / "eval",
    )
    with open_dict(cfg):
        cfg.fid.feature_extractor = {"_target_": "test_fid.TinyFeatures"}
    return cfg


@pytest.fixture
def checkpoint(tiny_config, tmp_path: Path) -> Path:
    """A checkpoint as training writes it (weights + the config that rebuilds the module)."""
    module = build_module(tiny_config())
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "flowerdiff_config": module.config}, path)
    return path


@pytest.mark.slow
def test_evaluate_checkpoint_writes_json_next_to_it(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    cfg = evaluate_config(tmp_path, f"ckpt_path={checkpoint}", "num_samples=6", "steps=2", "seed=3")
    result = evaluate(cfg)
    written = checkpoint.with_name("last.fid-6-2steps-seed3.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(result))
    assert result["fid"] > 0 and result["num_samples"] == 6 and result["num_real"] == 16
    assert "kid_mean" in result and not result["reference_cached"]
    assert "num_inference_steps=2" in result["sampler"]
    assert set(result["timings"]) == {"reference_s", "sampling_s", "features_s", "statistics_s"}
    assert "FID" in capsys.readouterr().out
    # The data set's reference statistics are now cached; a second evaluation reuses them and,
    # with the same seed, scores the same images identically.
    again = evaluate(cfg)
    assert again["reference_cached"] and again["fid"] == pytest.approx(result["fid"])


def test_evaluate_image_folder_against_itself_is_zero(image_folder: Path, tmp_path: Path) -> None:
    data = [o for o in TINY_OVERRIDES if o.startswith("data.")]
    cfg = evaluate_config(
        tmp_path, f"images_dir={image_folder}", "data=folder", f"data.root={image_folder}", *data
    )
    result = evaluate(cfg)
    assert abs(result["fid"]) < 1e-3 and result["num_samples"] == 16
    assert (tmp_path / "images.fid.json").is_file()


def test_evaluate_needs_exactly_one_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ckpt_path"):
        evaluate(evaluate_config(tmp_path))


def test_crafted_data_config_in_a_checkpoint_does_not_run(checkpoint: Path, tmp_path: Path) -> None:
    """evaluate.py instantiates the checkpoint's `data` node: a crafted one must be refused."""
    from flowerdiff.checkpoint import CheckpointError

    marker = tmp_path / "pwned"
    stored = torch.load(checkpoint, weights_only=True)
    stored["flowerdiff_config"]["data"] = {"_target_": "torch.save", "obj": 1, "f": str(marker)}
    torch.save(stored, checkpoint)
    cfg = evaluate_config(tmp_path, f"ckpt_path={checkpoint}", "num_samples=2")
    with pytest.raises(CheckpointError, match="Refusing to build"):
        evaluate(cfg)
    assert not marker.exists()
