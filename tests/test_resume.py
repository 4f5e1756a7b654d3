"""Exact resume: 4 steps straight == 2 steps + `ckpt_path=last` + 2 steps, with EMA on."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig

import flowerdiff.tasks.train
from flowerdiff.infra.checkpoints import read_checkpoint as load_checkpoint
from flowerdiff.infra.resume import InterruptCheckpoint, RNGState, resolve_ckpt_path
from flowerdiff.tasks.train import train

from conftest import REPO_ROOT, TINY_OVERRIDES, compose_config

# 8 training images (val_fraction 0.5 of 16) in batches of 4: 2 optimizer steps per epoch, so
# the interrupted run stops at the epoch boundary. Validation runs (on the EMA weights) after
# each epoch, as in a real run.
RESUME_OVERRIDES = ["data.val_fraction=0.5", "trainer.max_epochs=2", "callbacks.ema.decay=0.5"]


class StopAfter(Callback):
    """Stop training after ``steps`` optimizer steps, as a preempted job would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def run_config(tmp_path: Path, image_folder: Path, run: str, *extra: str) -> DictConfig:
    overrides = [
        *TINY_OVERRIDES,
        *RESUME_OVERRIDES,
        f"data.root={image_folder}",
        f"paths.root_dir={tmp_path}",
        *extra,
    ]
    return compose_config(overrides, output_dir=tmp_path / run)


@pytest.mark.slow
def test_resume_is_exact_with_ema(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(run_config(tmp_path, image_folder, "straight"))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")

    instantiate = flowerdiff.tasks.train.instantiate_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(
            flowerdiff.tasks.train,
            "instantiate_callbacks",
            lambda c: [*instantiate(c), StopAfter(2)],
        )
        train(run_config(tmp_path, image_folder, "resumed"))
    first_half = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert first_half["global_step"] == 2
    train(run_config(tmp_path, image_folder, "resumed", "ckpt_path=last"))
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")

    assert resumed["global_step"] == straight["global_step"] == 4
    # Training weights, EMA weights, optimizer moments and LR schedule: bit-identical.
    for key in ("current_model_state", "state_dict"):
        assert straight[key].keys() == resumed[key].keys()
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}[{name}] differs after resume"
    for name, value in straight["averaging_state"].items():
        assert torch.equal(value, resumed["averaging_state"][name]), name
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]
    moments = zip(
        straight["optimizer_states"][0]["state"].values(),
        resumed["optimizer_states"][0]["state"].values(),
        strict=True,
    )
    for a, b in moments:
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # The EMA really differs from the training weights, so the comparison above would catch a
    # resume that continued from the EMA weights instead of the training weights.
    assert any(
        not torch.equal(value, resumed["current_model_state"][name])
        for name, value in resumed["state_dict"].items()
        if value.is_floating_point()
    )


def test_rng_state_round_trip() -> None:
    """The states come back when training starts (not at load, which Lightning's set-up follows
    with draws of its own)."""
    callback = RNGState()
    saved = callback.state_dict()
    first = (torch.rand(3), np.random.rand(3), random.random())
    callback.load_state_dict(saved)
    assert callback.state_dict() is not None  # a save before training resumes keeps the load
    torch.rand(5)  # set-up drawing numbers between the load and the start of training
    trainer = SimpleNamespace(train_dataloader=None, num_training_batches=0)
    callback.on_train_start(trainer, None)  # type: ignore[arg-type]
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_ckpt_path_last_picks_newest_of_this_run(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=checkpoints), InterruptCheckpoint(str(checkpoints))],
        logger=False,
        accelerator="cpu",
    )
    assert resolve_ckpt_path(None, trainer) is None
    assert resolve_ckpt_path("last", trainer) is None  # first launch: start from scratch

    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("last", trainer) == str(checkpoints / "last.ckpt")
    # A SLURM requeue checkpoint written later wins, and so does a newer on-exception one.
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    os.utime(hpc, (time.time() + 10, time.time() + 10))
    assert resolve_ckpt_path("last", trainer) == str(hpc)
    on_exception = checkpoints / "on_exception.ckpt"
    on_exception.write_bytes(b"")
    os.utime(on_exception, (time.time() + 20, time.time() + 20))
    assert resolve_ckpt_path("last", trainer) == str(on_exception)

    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), trainer)


def test_each_ddp_rank_gets_its_own_stream_but_one_sampler_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    streams = []
    for rank in (0, 1):
        trainer = SimpleNamespace(global_rank=rank, world_size=2)
        RNGState(seed=42).setup(trainer, None, "fit")  # type: ignore[arg-type]
        streams.append(torch.rand(4))
    assert not torch.equal(*streams)  # different timesteps and noise on each rank
    assert os.environ["PL_GLOBAL_SEED"] == "42"  # the DistributedSampler's seed is left alone


class CrashAfter(Callback):
    """Raise after ``steps`` optimizer steps, as a crash or a SIGTERM would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.steps:
            raise RuntimeError("simulated crash")


class FirstStep(Callback):
    """Records the global step of the first training batch (where fit started from)."""

    def __init__(self) -> None:
        self.first: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.first is None:
            self.first = trainer.global_step


@pytest.mark.slow
def test_crash_checkpoint_resumes_with_last_and_null_starts_fresh(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instantiate = flowerdiff.tasks.train.instantiate_callbacks

    def run(*extra: str, crash: bool = False) -> int | None:
        first = FirstStep()
        added = [first, CrashAfter(1)] if crash else [first]
        with monkeypatch.context() as patch:
            patch.setattr(
                flowerdiff.tasks.train, "instantiate_callbacks", lambda c: [*instantiate(c), *added]
            )
            train(run_config(tmp_path, image_folder, "run", *extra))
        return first.first

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash=True)
    interrupt = tmp_path / "run" / "checkpoints" / "on_exception.ckpt"
    assert load_checkpoint(interrupt)["global_step"] == 1
    assert run("ckpt_path=last") == 1  # continues from the crash checkpoint
    assert not interrupt.exists()  # a normal end removes the stale interrupt checkpoint
    # ckpt_path=null is a fresh start even with checkpoints in the folder (Lightning's own
    # OnExceptionCheckpoint would silently resume last.ckpt here).
    assert run() == 0


# -- the command line, as a user or a scheduler interrupts it ---------------------------------
# 12 training images in batches of 4: 3 optimizer steps per epoch, 6 epochs, EMA and the grid
# callback on, validation (and an epoch-end last.ckpt) after every epoch.
CLI_OVERRIDES = [
    "trainer.max_epochs=6",
    "trainer.max_steps=-1",  # epoch-bound (with both limits set, Lightning ends a resumed run an epoch early)
    "callbacks.ema.decay=0.9",
    "callbacks.denoising_grid.every_n_epochs=2",
]


def train_cli(run_dir: Path, image_folder: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        *TINY_OVERRIDES,
        *CLI_OVERRIDES,
        f"data.root={image_folder}",
        f"paths.root_dir={run_dir.parent}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": tests, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def interrupted_at(step: int, signal: str) -> list[str]:
    return [
        "+callbacks.interrupt._target_=interrupts.SignalAt",
        f"+callbacks.interrupt.step={step}",
        f"+callbacks.interrupt.signal={signal}",
    ]


def assert_same_training_state(a: dict, b: dict) -> None:
    """Training and EMA weights, Adam moments, EMA counters and LR schedule: bit-identical."""
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}[{name}] differs after resume"
    for x, y in zip(
        a["optimizer_states"][0]["state"].values(),
        b["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(x[k], y[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    for name, value in a["averaging_state"].items():
        assert torch.equal(value, b["averaging_state"][name]), name
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """18 steps without interruption; shared by the interruption tests below."""
    root = tmp_path_factory.mktemp("straight")
    from conftest import write_images

    images = write_images(root / "images", count=16)
    result = train_cli(root / "run", images)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint(root / "run" / "checkpoints" / "last.ckpt"), images


@pytest.mark.slow
def test_kill_9_after_an_epoch_checkpoint_then_last_is_bit_identical(
    straight_run: tuple[dict, Path], tmp_path: Path
) -> None:
    """kill -9 two steps into the third epoch (last.ckpt holds step 6), then ckpt_path=last:
    the end state equals the straight run's, tensor by tensor."""
    straight, images = straight_run
    killed = train_cli(tmp_path / "run", images, *interrupted_at(8, "KILL"))
    assert killed.returncode == -9
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6
    resumed = train_cli(tmp_path / "run", images, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(
        straight, load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    )


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_non_zero_and_resumes_bit_identically(
    straight_run: tuple[dict, Path], tmp_path: Path
) -> None:
    """Preemption one step into an epoch: the interrupt checkpoint is written, the process exits
    143 (so a scheduler sees the interruption), and the resumed run skips exactly the batches
    already trained on."""
    straight, images = straight_run
    stopped = train_cli(tmp_path / "run", images, *interrupted_at(7, "TERM"))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Stopped by SIGTERM after step 7" in stopped.stdout + stopped.stderr
    interrupt = tmp_path / "run" / "checkpoints" / "on_exception.ckpt"
    assert load_checkpoint(interrupt)["global_step"] == 7
    resumed = train_cli(tmp_path / "run", images, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(
        straight, load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    )
