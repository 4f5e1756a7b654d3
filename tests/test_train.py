"""train(cfg) end to end on CPU with unet_tiny: checkpoints, metrics, then sampling from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowerdiff.infra.checkpoints import read_checkpoint
from flowerdiff.infra.exports import load_model
from flowerdiff.tasks.train import train


@pytest.mark.slow
def test_train_writes_checkpoint_and_metrics_then_samples(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    metrics = train(cfg)
    for key in ("train/loss", "val/loss"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    checkpoint = read_checkpoint(checkpoints / "last.ckpt")
    assert checkpoint["global_step"] == 3  # 12 training images / batch 4, one epoch
    stored = checkpoint["flowerdiff"]
    assert stored["network"]["hidden_dims"] == [16, 32, 32, 64]
    assert stored["image_shape"] == [3, 16, 16]
    # what rebuilds the model, nothing else: no data, optimizer or logger config
    assert set(stored) == {"format", "network", "diffusion", "image_shape", "class_names"}
    assert "datamodule_hyper_parameters" not in checkpoint
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()

    module = load_model(checkpoints / "last.ckpt")
    out = module.sample(3, seed=7, return_intermediates=True)
    assert out.images.shape == (3, 3, 16, 16)
    assert out.images.min() >= -1 and out.images.max() <= 1
    assert len(out.intermediates) == cfg.sampler.num_inference_steps
    again = module.sample(3, seed=7)
    assert torch.equal(out.images, again.images)


def test_train_script_prints_a_user_error_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import REPO_ROOT

    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "data=folder",
            f"data.root={missing}",
            "model=unet_tiny",
            "logger=csv",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert f"Error: data.root='{missing}' is not a directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_learned_loss_weighting_trains_its_head_and_stays_out_of_the_model(
    tiny_config, tmp_path: Path
) -> None:
    """EDM2's weighting head is optimised with the network (it moves from zero, it has Adam
    moments), it is in the checkpoint for an exact resume, and sampling, exports and
    post-hoc exports read the network without it."""
    from flowerdiff.infra.config import build_module
    from flowerdiff.infra.exports import export_checkpoint

    cfg = tiny_config(
        "diffusion=edm", "sampler=heun", "diffusion.learned_weighting=true", "optimizer.lr=1e-2"
    )
    train(cfg)
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    head = checkpoint["current_model_state"]["diffusion.logvar.linear.weight"]
    assert head.abs().sum() > 0  # trained: it starts at zero
    assert "diffusion.logvar.linear.bias" in checkpoint["state_dict"]  # the EMA averages it too
    moments = checkpoint["optimizer_states"][0]["state"]
    module = build_module(cfg)
    assert len(moments) == len(list(module.net.parameters())) + 2  # and the head's two
    assert checkpoint["flowerdiff"]["diffusion"]["learned_weighting"] is True

    module = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert module.sample(2, seed=0).images.isfinite().all()
    exported = export_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "e")
    assert torch.equal(
        load_model(exported).sample(2, seed=0).images, module.sample(2, seed=0).images
    )
