"""Multi-process training (DDP over gloo on the CPU) and the SLURM launcher config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flowerdiff.infra.checkpoints import read_checkpoint
from flowerdiff.infra.exports import load_model

from conftest import REPO_ROOT, TINY_OVERRIDES, compose_config, write_images


@pytest.mark.slow
def test_ddp_two_cpu_processes_count_optimizer_steps(tmp_path: Path) -> None:
    """32 images, global batch 8 over 2 processes (4 each), 2 batches accumulated per step:
    one epoch is 2 optimizer steps of 16 images, and the LR schedule spans exactly those 2."""
    images = write_images(tmp_path / "images", count=32)
    run_dir = tmp_path / "run"
    overrides = [
        *TINY_OVERRIDES,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.accumulate_grad_batches=2",
        "data.batch_size=8",
        "data.val_fraction=0",
        "lr_scheduler.warmup_steps=1",
        "optimized_metric=train/loss",  # no validation split here
        f"data.root={images}",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={run_dir}",
    ]
    # Lightning's DDP launcher re-runs the script for rank 1, so train through the real entry point.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0000.ckpt", "last.ckpt"]
    checkpoint = read_checkpoint(checkpoints / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert all(s["step"] == 2 for s in checkpoint["optimizer_states"][0]["state"].values())
    # warm-up 1 step, then cosine to 0 at step 2: reached only if total_steps == 2 (per-process
    # batches or ignoring accumulation would give 4 and leave the LR at 75% of its peak).
    assert checkpoint["lr_schedulers"][0]["_last_lr"] == [0.0]
    assert load_model(checkpoints / "last.ckpt").sample(1, seed=0).images.isfinite().all()


def test_slurm_launcher_composes_with_trainer_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hydra/launcher=slurm` takes nodes/tasks/GPUs from the trainer, and the sbatch script
    asks for the signal Lightning's SLURMEnvironment listens on (SIGUSR1) and allows requeue."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_config(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=3",
            "hydra.launcher.partition=gpu",
        ]
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (3, 4, 4)

    # Build the sbatch script as the launcher does (submitit refuses without srun: pretend).
    monkeypatch.setattr(submitit.slurm.slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    for key in ("_target_", "submitit_folder"):
        params.pop(key)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in (
        "--nodes=3",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--signal=USR1@120",
        "--requeue",
    ):
        assert f"#SBATCH {line}\n" in script, line
