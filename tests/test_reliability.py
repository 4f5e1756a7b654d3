"""Faults: NaN/Inf losses, kill -9 during checkpoint saves, malicious checkpoints, odd data in
data-loader workers."""

from __future__ import annotations

import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flowerdiff.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from flowerdiff.checkpoint import CheckpointError, load_checkpoint, load_module
from flowerdiff.checkpoint_io import AtomicCheckpointIO, partial_path
from flowerdiff.data import FlowersDataModule
from flowerdiff.train import train

from conftest import REPO_ROOT, TINY_OVERRIDES, write_images

EVERY_STEP = [  # last.ckpt after every step, nothing else
    "~callbacks.model_checkpoint",
    "callbacks.last_checkpoint.every_n_epochs=null",
    "+callbacks.last_checkpoint.every_n_train_steps=1",
]


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# -- NaN / Inf losses ---------------------------------------------------------------------------
@pytest.fixture
def nan_at_steps(monkeypatch):
    """Make the training images NaN (hence the loss) at the given global steps."""
    steps: set[int] = set()
    original = FlowersDataModule.on_after_batch_transfer

    def poisoned(self, batch, dataloader_idx):
        images, indices = original(self, batch, dataloader_idx)
        if self.trainer.training and self.trainer.global_step in steps:
            images = torch.full_like(images, float("nan"))
        return images, indices

    monkeypatch.setattr(FlowersDataModule, "on_after_batch_transfer", poisoned)
    return steps


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_config, tmp_path, nan_at_steps
) -> None:
    nan_at_steps.add(2)
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_config(*EVERY_STEP, "data.val_fraction=0", "trainer.max_epochs=2"))
    message = str(info.value)
    assert message.startswith("Training stopped at step 2 (epoch 0): the loss is NaN/Inf.")
    assert f"The last good checkpoint is {checkpoints / 'last.ckpt'}" in message
    assert "callbacks.nan_guard.skip_batch=true" in message
    checkpoint = load_checkpoint(checkpoints / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert all_finite(checkpoint["state_dict"]) and all_finite(checkpoint["current_model_state"])
    for other in checkpoints.glob("*.ckpt"):  # e.g. on_exception.ckpt: finite as well
        assert all_finite(load_checkpoint(other)["state_dict"]), other


@pytest.mark.slow
def test_nan_loss_batch_is_skipped_when_configured(
    tiny_config, tmp_path, nan_at_steps, caplog
) -> None:
    nan_at_steps.add(1)
    cfg = tiny_config(
        *EVERY_STEP,
        "data.val_fraction=0",
        "callbacks.nan_guard.skip_batch=true",
        "trainer.max_steps=3",
    )
    with caplog.at_level(logging.WARNING, logger="flowerdiff.callbacks.nan_guard"):
        train(cfg)
    assert "Non-finite loss at step 1 (epoch 0): skipped this batch" in caplog.text
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    assert all_finite(checkpoint["state_dict"]) and all_finite(checkpoint["current_model_state"])
    # AdamW updated every weight twice, not three times: the NaN batch never reached them.
    adam_steps = {float(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2.0}


def fake_trainer(step: int = 7) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step,
        current_epoch=0,
        precision_plugin=SimpleNamespace(),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
        checkpoint_callbacks=[],
        ckpt_path="/runs/a/checkpoints/last.ckpt",
    )


def test_nan_gradient_with_finite_loss_is_caught_before_the_step() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.grad = torch.tensor([1.0, float("inf"), 0.0])
    guard = NaNGuard()
    guard.on_before_backward(fake_trainer(), None, torch.tensor(0.5))
    with pytest.raises(NonFiniteLossError, match=r"step 7 .*the gradient norm is NaN/Inf.*"):
        guard.on_before_optimizer_step(fake_trainer(), None, optimizer)


def test_skipping_stops_after_too_many_bad_batches_in_a_row() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    guard = NaNGuard(skip_batch=True, max_consecutive_skips=2)
    for step in (1, 2):
        weight.grad = torch.ones(3)
        guard.on_before_backward(fake_trainer(step), None, torch.tensor(float("nan")))
        guard.on_before_optimizer_step(fake_trainer(step), None, optimizer)
        assert weight.grad is None  # skipped: the optimizer leaves the weight alone
    guard.on_before_backward(fake_trainer(3), None, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError) as info:
        guard.on_before_optimizer_step(fake_trainer(3), None, optimizer)
    message = str(info.value)
    assert "step 3" in message and "NaN/Inf for 3 batches in a row" in message
    assert "ckpt_path=/runs/a/checkpoints/last.ckpt" in message  # resumed-from checkpoint


def test_checkpoint_with_nan_weights_is_never_written() -> None:
    checkpoint = {"state_dict": {"net.w": torch.tensor([1.0, float("nan")]), "n": torch.ones(1)}}
    with pytest.raises(NonFiniteLossError, match=r"Refusing to save .* step 7.*\(net\.w\)"):
        NaNGuard().on_save_checkpoint(fake_trainer(), None, checkpoint)


# -- crash-safe checkpoint files ----------------------------------------------------------------
def test_training_config_uses_the_atomic_writer_and_the_nan_guard(tiny_config) -> None:
    cfg = tiny_config()
    targets = [plugin["_target_"] for plugin in cfg.trainer.plugins]
    assert "flowerdiff.checkpoint_io.AtomicCheckpointIO" in targets
    assert cfg.callbacks.nan_guard._target_ == "flowerdiff.callbacks.nan_guard.NaNGuard"


def test_failed_save_keeps_the_previous_file_and_leaves_no_partial(tmp_path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, target)

    def dies_half_way(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, target)
    assert load_checkpoint(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # Lightning's ckpt_path="last" takes the newest file with "last" in its name.
    assert "last" not in partial_path(target).name


def train_command(tmp_path: Path, images: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        *TINY_OVERRIDES,
        *EVERY_STEP,
        f"data.root={images}",
        "data.val_fraction=0",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.max_epochs=1000",
        "optimized_metric=train/loss",  # no validation split here
        *extra,
    ]


def entries(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file: any change means a save is under way."""
    found = {}
    for entry in os.scandir(folder) if folder.is_dir() else ():
        try:
            stat = entry.stat()
        except FileNotFoundError:  # renamed away while listing
            continue
        found[entry.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


def wait_for(
    condition, process: subprocess.Popen, log: Path, poll: float = 0.01, timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited early ({process.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for a checkpoint:\n{log.read_text()[-3000:]}")
        time.sleep(poll)


@pytest.mark.slow
def test_kill_9_during_checkpoint_saves_never_corrupts_last_ckpt(tmp_path) -> None:
    """Three training processes, each resuming the previous one's last.ckpt, are SIGKILLed: two
    at the moment a save starts, one at a random moment; then a last resume runs to the end."""
    images = write_images(tmp_path / "images", 16)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rng = random.Random(0)
    step, resume = 0, []
    for attempt, moment in enumerate(("save", "save", "random")):
        log = tmp_path / f"train_{attempt}.log"
        before = entries(checkpoints).get("last.ckpt")
        with open(log, "w") as out:
            process = subprocess.Popen(
                train_command(tmp_path, images, *resume), stdout=out, stderr=out, env=env
            )
        try:
            # Wait for a complete save by this process, then kill when the next one starts.
            wait_for(
                lambda b=before: entries(checkpoints).get("last.ckpt") not in (None, b),
                process,
                log,
            )
            if moment == "save":
                settled = entries(checkpoints)
                wait_for(lambda s=settled: entries(checkpoints) != s, process, log, poll=0.0005)
            else:
                time.sleep(rng.uniform(0.0, 1.5))
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        checkpoint = load_checkpoint(last)  # never truncated, whatever the moment of the kill
        assert checkpoint["global_step"] > step, "the resumed run made no progress"
        assert all_finite(checkpoint["state_dict"])
        step = checkpoint["global_step"]
        resume = [f"ckpt_path={last}"]

    log = tmp_path / "train_final.log"
    with open(log, "w") as out:
        done = subprocess.run(
            train_command(tmp_path, images, *resume, f"trainer.max_steps={step + 2}"),
            stdout=out,
            stderr=out,
            env=env,
            timeout=300,
        )
    assert done.returncode == 0, log.read_text()[-3000:]
    assert load_checkpoint(last)["global_step"] == step + 2
    assert load_module(last).sample(1, seed=0).images.isfinite().all()
    assert not list(checkpoints.glob(".*.partial")), "a partial file was left behind"


# -- untrusted files ----------------------------------------------------------------------------
class CreatesFile:
    """Unpickling this runs ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_checkpoint_does_not_run_its_code(tmp_path, writer) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {}, "flowerdiff_config": CreatesFile(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    for load in (load_checkpoint, load_module):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert not marker.exists(), "loading the checkpoint executed its code"
    message = str(info.value)
    assert f"Refusing to load {str(path)!r}" in message and "would execute code" in message
    assert "Only load checkpoints you trust" in message
    # The payload is real: an unsafe load does run it (so this test can fail).
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_checkpoint_config_cannot_name_arbitrary_functions(tiny_config, tmp_path) -> None:
    """weights_only=True is not enough: building the module instantiates the stored config."""
    from flowerdiff.build import build_module, module_config

    cfg = tiny_config()
    victim = tmp_path / "written_by_config"
    config = module_config(cfg)
    config["sampler"] = {"_target_": "torch.save", "obj": 1, "f": str(victim)}
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": build_module(cfg).state_dict(), "flowerdiff_config": config}, path)
    with pytest.raises(CheckpointError) as info:
        load_module(path)
    assert not victim.exists()
    message = str(info.value)
    assert "Refusing to build the model stored in" in message
    assert "sampler._target_='torch.save'" in message and "could run arbitrary code" in message


def test_truncated_checkpoint_says_which_file_and_what_to_do(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"Could not read checkpoint .*last\.ckpt.*truncated"):
        load_checkpoint(path)


# -- data: nothing can fail inside a data-loader worker -----------------------------------------
def test_workers_serve_small_odd_and_corrupt_inputs_without_errors(tmp_path) -> None:
    folder = write_images(tmp_path / "imgs", 6)
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(folder / "tiny.png")  # < 16 px
    Image.new("LA", (3, 9), (90, 255)).save(folder / "gray_alpha.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    dm = FlowersDataModule(
        source="folder",
        root=str(folder),
        image_size=16,
        batch_size=3,
        val_fraction=0.0,
        num_workers=2,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.warns(UserWarning, match=r"(?s)Skipped 1 of 10 files.*broken\.jpg"):
        dm.setup("fit")
    seen = 0
    for images, indices in dm.train_dataloader():  # worker processes index decoded tensors only
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8
        seen += len(indices)
    assert seen == 9
    by_name = dict(
        zip(
            sorted(p.name for p in folder.iterdir() if p.name != "broken.jpg"),
            dm.images,
            strict=True,
        )
    )
    assert by_name["tiny.png"].float().mean() == pytest.approx(200, abs=1)  # upscaled, unchanged
    assert by_name["cmyk.jpg"][0].float().mean() > 200  # red
