"""Faults: NaN/Inf losses, kill -9 during checkpoint saves, untrusted checkpoints and exports
(issue 15, section 1: stored configs are data, never a program), unreadable checkpoint files,
odd data in data-loader workers."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowerdiff.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from flowerdiff.data import FlowersDataModule
from flowerdiff.files import partial_path
from flowerdiff.infra.checkpoint_io import AtomicCheckpointIO
from flowerdiff.infra.checkpoints import CheckpointError, read_checkpoint
from flowerdiff.infra.config import ConfigError
from flowerdiff.infra.exports import export_checkpoint, load_model
from flowerdiff.tasks.evaluate import evaluate
from flowerdiff.tasks.export import export
from flowerdiff.tasks.sample import sample
from flowerdiff.tasks.train import train

from conftest import REPO_ROOT, TINY_OVERRIDES, compose_config, write_images

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
        images, *rest = original(self, batch, dataloader_idx)
        if self.trainer.training and self.trainer.global_step in steps:
            images = torch.full_like(images, float("nan"))
        return (images, *rest)

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
    checkpoint = read_checkpoint(checkpoints / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert all_finite(checkpoint["state_dict"]) and all_finite(checkpoint["current_model_state"])
    for other in checkpoints.glob("*.ckpt"):  # e.g. on_exception.ckpt: finite as well
        assert all_finite(read_checkpoint(other)["state_dict"]), other


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
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
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
    assert "flowerdiff.infra.checkpoint_io.AtomicCheckpointIO" in targets
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
    assert read_checkpoint(target)["step"] == 1
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
        checkpoint = read_checkpoint(last)  # never truncated, whatever the moment of the kill
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
    assert read_checkpoint(last)["global_step"] == step + 2
    assert load_model(last).sample(1, seed=0).images.isfinite().all()
    assert not list(checkpoints.glob(".*.partial")), "a partial file was left behind"


# -- untrusted files: a stored config is data, never a program (issue 15, section 1) --------
# Every payload below creates `marker` when the old design's `instantiate(resolved config)` (or
# `yaml.unsafe_load`) meets it: test_payloads_are_live proves it, so each refusal test can fail.
RESOLVER = "${oc.decode:'{_target_: builtins.open, file: %s, mode: a}'}"


def opens(marker: Path, **extra: Any) -> dict[str, Any]:
    """A config node that Hydra's instantiate turns into ``open(marker, "a")``."""
    return {"_target_": "builtins.open", "file": str(marker), "mode": "a", **extra}


def spec_payloads(marker: Path) -> dict[str, tuple[tuple[str, ...], Any, str]]:
    """name -> (where in the stored model description, what is put there, a word the refusal
    must contain)."""
    hidden = RESOLVER % marker
    args = {"_target_": "builtins.open", "_args_": [str(marker), "a"]}
    return {
        "resolver-in-network": (("network", "hidden_dims"), hidden, "interpolation"),
        "resolver-in-network-name": (("network", "name"), hidden, "interpolation"),
        "resolver-in-diffusion": (("diffusion", "prediction"), hidden, "interpolation"),
        "resolver-in-schedule": (("diffusion", "schedule", "name"), hidden, "interpolation"),
        "resolver-in-sampler": (("diffusion", "sampler", "eta"), hidden, "interpolation"),
        "resolver-in-class-names": (("class_names",), ["daisy", hidden], "interpolation"),
        "resolver-in-image-shape": (("image_shape",), [3, hidden, 16], "image_shape"),
        "resolver-in-format": (("format",), hidden, "format"),
        "resolver-as-key": (("network", hidden), 1, "interpolation"),
        "target-as-network": (("network",), opens(marker), "_target_"),
        "nested-target": (("network", "dropout"), opens(marker), "_target_"),
        "nested-target-in-flag": (
            ("diffusion", "sampler", "clip_sample"),
            opens(marker),
            "_target_",
        ),
        "args": (("diffusion", "sampler"), args, "_target_"),
        "partial": (("diffusion", "loss"), opens(marker, _partial_=True), "_target_"),
        "target-in-list": (("network", "hidden_dims"), [16, opens(marker), 32, 64], "_target_"),
        "unknown-key": (("data",), opens(marker), "unknown keys ['data']"),
        "unknown-sampler-option": (("diffusion", "sampler", "on_load"), "touch", "on_load"),
        "flag-of-wrong-type": (("diffusion", "sampler", "clip_sample"), ["yes"], "clip_sample"),
        "network-misfits-weights": (("network", "hidden_dims"), [16, 32, 32, 32], "do not fit"),
        "channels-misfit-network": (("image_shape",), [1, 16, 16], "image_shape"),
    }


SPEC_PAYLOADS = list(spec_payloads(Path("marker")))
LIVE_PAYLOADS = [  # those that carry code (the others are damaged or edited files)
    name
    for name, (_, value, _) in spec_payloads(Path("m")).items()
    if "_target_" in repr(value) or "${" in repr(value)
]


def with_payload(spec: dict[str, Any], where: tuple[str, ...], value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    node = spec
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return spec


def crafted_checkpoint(good: Path, payload: str, marker: Path) -> Path:
    """``good`` with ``payload`` in its stored model description (weights untouched)."""
    where, value, _ = spec_payloads(marker)[payload]
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["flowerdiff"] = with_payload(checkpoint["flowerdiff"], where, value)
    path = good.parent / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def assert_refused(error: BaseException, path: Path, reason: str) -> None:
    """One paragraph that names the file and why."""
    message = str(error)
    assert str(path) in message, message
    assert reason in message, message
    assert "\n" not in message.strip(), message


def reshaped_weight(checkpoint: dict[str, Any]) -> None:
    checkpoint["state_dict"]["net.conv_out.weight"] = torch.zeros(3, 16, 3, 3)


def foreign_entry(checkpoint: dict[str, Any]) -> None:
    checkpoint["state_dict"]["optimizer_hook"] = torch.zeros(1)


def foreign_process_entry(checkpoint: dict[str, Any]) -> None:
    """An entry where the diffusion process keeps what it learns (EDM2's weighting head)."""
    checkpoint["state_dict"]["diffusion.hook"] = torch.zeros(1)


def reshaped_raw_weight(checkpoint: dict[str, Any]) -> None:
    raw = dict(checkpoint["state_dict"])
    raw["net.init_conv.weight"] = torch.zeros(1)
    checkpoint["current_model_state"] = raw


WEIGHT_EDITS: dict[Callable[[dict[str, Any]], None], str] = {
    reshaped_weight: "other shapes ['conv_out.weight']",
    foreign_entry: "entries ['optimizer_hook'] that belong to no part",
    foreign_process_entry: "diffusion weights (state_dict)",
    reshaped_raw_weight: "weights (current_model_state)",
}


def entry_runner(
    name: str, tmp_path: Path, tiny_config: Callable[..., Any], extractor: torch.nn.Module
) -> Callable[[Path], Any]:
    """``run(path)``: one entry point that reads a model (the scripts' logic, in-process), its
    config composed once and pointed at each file in turn."""
    if name == "load_model":
        return load_model
    if name == "train":  # resuming: ckpt_path=...
        cfg = tiny_config()
    elif name == "sample":
        out = tmp_path / "samples"
        overrides = [f"out_dir={out}", "device=cpu", "num_images=2", "trajectory_images=0"]
        cfg = compose_config(overrides, "sample", output_dir=out)
    elif name == "evaluate":
        overrides = [
            "num_samples=4",
            "device=cpu",
            "data=folder",
            f"data.root={tmp_path / 'images'}",
            f"fid.cache_dir={tmp_path / 'fid'}",
            f"output_json={tmp_path / 'eval.json'}",
        ]
        cfg = compose_config(overrides, "evaluate", output_dir=tmp_path / "eval")
    else:
        assert name == "export"
        cfg = compose_config(
            [f"out_dir={tmp_path / 'exported'}"], "export", output_dir=tmp_path / "hydra"
        )
    task = {"train": train, "sample": sample, "export": export}.get(name)

    def run(path: Path) -> Any:
        cfg.ckpt_path = str(path)
        return evaluate(cfg, extractor=extractor) if task is None else task(cfg)

    return run


CHECKPOINT_READERS = ["sample", "evaluate", "export", "train"]
EXPORT_READERS = ["sample", "evaluate", "load_model"]


def test_payloads_are_live(tmp_path: Path) -> None:
    """Resolved, then instantiated, as the old design built a stored config: each payload runs
    its code (so every refusal test below can fail)."""
    for payload in LIVE_PAYLOADS:
        marker = tmp_path / payload
        _, value, _ = spec_payloads(marker)[payload]
        built = instantiate(OmegaConf.to_container(OmegaConf.create({"node": value}), resolve=True))
        if callable(built["node"]):  # `_partial_`: runs when the factory is called
            built["node"]()
        assert marker.exists(), payload


@pytest.mark.parametrize("entry", CHECKPOINT_READERS)
def test_checkpoint_payloads_are_refused(
    entry: str, tiny_checkpoint: Path, tiny_config, forbidden_extractor, tmp_path: Path
) -> None:
    """Every payload class in a .ckpt's model description, against one entry point."""
    run = entry_runner(entry, tmp_path, tiny_config, forbidden_extractor)
    marker = tmp_path / "marker"
    for payload in SPEC_PAYLOADS:
        path = crafted_checkpoint(tiny_checkpoint, payload, marker)
        with pytest.raises(CheckpointError) as info:
            run(path)
        assert not marker.exists(), f"{payload}: the stored config ran code"
        assert_refused(info.value, path, spec_payloads(marker)[payload][2])
    # The description intact, the weights edited: what a resume would hand to Lightning.
    for edit, reason in WEIGHT_EDITS.items():
        checkpoint = torch.load(tiny_checkpoint, weights_only=True)
        edit(checkpoint)
        path = tiny_checkpoint.parent / "edited-weights.ckpt"
        torch.save(checkpoint, path)
        with pytest.raises(CheckpointError) as info:
            run(path)
        assert_refused(info.value, path, reason)
    for folder in ("exported", "samples"):  # nothing written (the folders may have been created)
        assert not [p for p in (tmp_path / folder).rglob("*") if p.is_file()], folder


def test_a_learned_weighting_head_must_fit_its_description(tiny_config, tmp_path: Path) -> None:
    """EDM2's weighting head is the one part of the process with weights: a checkpoint whose
    head lost a tensor or changed its shape is refused, naming the part, before any model is
    built (a DDPM checkpoint's process has none, so the edits above cannot cover this)."""
    from flowerdiff.infra.config import build_module

    module = build_module(
        tiny_config("diffusion=edm", "sampler=heun", "diffusion.learned_weighting=true")
    )
    head = "diffusion.logvar.linear.weight"
    edits = {
        "reshaped": lambda state: state.__setitem__(head, torch.zeros(2, 128)),
        "missing": lambda state: state.pop(head),
    }
    for name, edit in edits.items():
        state = dict(module.state_dict())
        assert head in state
        edit(state)
        path = tmp_path / f"head-{name}.ckpt"
        torch.save({"state_dict": state, "flowerdiff": module.spec.to_dict()}, path)
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        assert_refused(info.value, path, "diffusion weights (state_dict)")
    intact = tmp_path / "head-intact.ckpt"
    torch.save({"state_dict": module.state_dict(), "flowerdiff": module.spec.to_dict()}, intact)
    assert load_model(intact).diffusion.logvar is not None


class CreatesFile:
    """Unpickling this runs ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


PICKLE_WRITERS = ["torch.save", "pickle.dump"]


def pickled_checkpoint(tmp_path: Path, writer: str, marker: Path) -> Path:
    path = tmp_path / f"evil-{writer}.ckpt"
    payload = {"state_dict": {}, "flowerdiff": CreatesFile(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def test_pickled_payloads_are_live(tmp_path: Path) -> None:
    for writer in PICKLE_WRITERS:
        marker = tmp_path / writer
        path = pickled_checkpoint(tmp_path, writer, marker)
        if writer == "torch.save":
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists(), writer


@pytest.mark.parametrize("entry", [*CHECKPOINT_READERS, "load_model"])
def test_pickled_checkpoint_is_refused(
    entry: str, tiny_config, forbidden_extractor, tmp_path: Path
) -> None:
    run = entry_runner(entry, tmp_path, tiny_config, forbidden_extractor)
    marker = tmp_path / "pwned"
    for writer in PICKLE_WRITERS:
        path = pickled_checkpoint(tmp_path, writer, marker)
        with pytest.raises((CheckpointError, ConfigError)) as info:
            run(path)
        assert not marker.exists(), "loading the checkpoint executed its code"
        message = str(info.value)
        assert str(path) in message
        if writer == "torch.save":  # a real (zip) checkpoint holding an object
            assert isinstance(info.value, CheckpointError)
            assert f"Refusing to load {str(path)!r}" in message
            assert "could execute code" in message and "Only load checkpoints you trust" in message
        else:  # a bare pickle is not even a PyTorch checkpoint
            assert "not a PyTorch checkpoint" in message and "execute code" not in message


# config.yaml of an export: the spec payloads, plus what only YAML can carry.
def yaml_payloads(marker: Path) -> dict[str, tuple[Callable[[str], str], str]]:
    """name -> (edit of config.yaml's text, a word the refusal must contain)."""
    target = f"{{_target_: builtins.open, file: '{marker}', mode: a}}"

    def anchored(text: str) -> str:
        text = text.replace("    dropout: 0.0", f"    dropout: &payload {target}", 1)
        return text.replace("    num_classes: null", "    num_classes: *payload", 1)

    def tagged(tag: str) -> Callable[[str], str]:
        return lambda text: text.replace("    dropout: 0.0", f"    dropout: {tag}", 1)

    def extra_section(text: str) -> str:
        return text + f"data: {target}\n"

    return {
        "yaml-anchor-alias": (anchored, "anchors"),
        "yaml-python-object-apply": (
            tagged(f"!!python/object/apply:builtins.open ['{marker}', a]"),
            "python/object/apply",
        ),
        "yaml-python-name": (tagged("!!python/name:builtins.open"), "python/name"),
        "yaml-python-object": (tagged("!!python/object:argparse.Namespace {}"), "python/object"),
        "yaml-unknown-section": (extra_section, "`model:`"),
    }


YAML_PAYLOADS = list(yaml_payloads(Path("marker")))


def test_yaml_payload_is_live(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = export_checkpoint(tiny_checkpoint, tmp_path / "export")
    marker = tmp_path / "marker"
    edit, _ = yaml_payloads(marker)["yaml-python-object-apply"]
    yaml.unsafe_load(edit((out / "config.yaml").read_text()))
    assert marker.exists()


def crafted_export(clean: Path, folder: Path, payload: str, marker: Path) -> Path:
    """A copy of the export ``clean`` whose config.yaml carries ``payload``; returns
    config.yaml's path."""
    config = Path(shutil.copytree(clean, folder)) / "config.yaml"
    if payload in YAML_PAYLOADS:
        edit, _ = yaml_payloads(marker)[payload]
        config.write_text(edit(config.read_text()))
    else:
        where, value, _ = spec_payloads(marker)[payload]
        document = yaml.safe_load(config.read_text())
        document["model"] = with_payload(document["model"], where, value)
        config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


@pytest.mark.parametrize("entry", EXPORT_READERS)
def test_export_config_payloads_are_refused(
    entry: str, tiny_checkpoint: Path, tiny_config, forbidden_extractor, tmp_path: Path
) -> None:
    run = entry_runner(entry, tmp_path, tiny_config, forbidden_extractor)
    marker = tmp_path / "marker"
    reasons = {name: why for name, (_, why) in yaml_payloads(marker).items()}
    reasons |= {name: why for name, (_, _, why) in spec_payloads(marker).items()}
    clean = export_checkpoint(tiny_checkpoint, tmp_path / "export")
    for payload in SPEC_PAYLOADS + YAML_PAYLOADS:
        config = crafted_export(clean, tmp_path / payload, payload, marker)
        with pytest.raises(CheckpointError) as info:
            run(config.parent)
        assert not marker.exists(), f"{payload}: the export's config ran code"
        assert_refused(info.value, config, reasons[payload])


def test_lone_safetensors_payloads_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Without config.yaml the description comes from the safetensors metadata."""
    out = export_checkpoint(tiny_checkpoint, tmp_path / "export")
    with safe_open(out / "model.safetensors", framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(out / "model.safetensors")
    marker = tmp_path / "marker"
    for payload in SPEC_PAYLOADS:
        where, value, reason = spec_payloads(marker)[payload]
        spec = with_payload(json.loads(metadata["model"]), where, value)
        alone = tmp_path / f"{payload}.safetensors"
        save_file(tensors, alone, metadata={**metadata, "model": json.dumps(spec)})
        with pytest.raises(CheckpointError) as info:
            load_model(alone)
        assert not marker.exists(), payload
        assert_refused(info.value, alone, reason)


def script(name: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """scripts/<name>.py in a subprocess, logs under ``tmp_path``; no GPU."""
    env = os.environ | {
        "FLOWERDIFF_ROOT": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, str(REPO_ROOT / "scripts" / f"{name}.py"), *overrides]
    command.append(f"hydra.run.dir={tmp_path / 'hydra' / name}")
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 1, ``Error: <one paragraph>`` on stderr, no traceback."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Error:" in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_scripts_refuse_crafted_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """sample.py, evaluate.py and export.py each meet one payload: exit 1, one paragraph."""
    marker = tmp_path / "marker"
    crafted = crafted_checkpoint(tiny_checkpoint, "resolver-in-network", marker)
    done = script("sample", tmp_path, f"ckpt_path={crafted}", f"out_dir={tmp_path / 's'}")
    assert_user_error(done, str(crafted), "interpolation")

    out = export_checkpoint(tiny_checkpoint, tmp_path / "export")
    edit, _ = yaml_payloads(marker)["yaml-python-object-apply"]
    (out / "config.yaml").write_text(edit((out / "config.yaml").read_text()))
    done = script("evaluate", tmp_path, f"ckpt_path={out}", "num_samples=4", "device=cpu")
    assert_user_error(done, str(out / "config.yaml"), "python/object/apply")

    crafted = crafted_checkpoint(tiny_checkpoint, "nested-target-in-flag", marker)
    done = script("export", tmp_path, f"ckpt_path={crafted}", f"out_dir={tmp_path / 'e'}")
    assert_user_error(done, str(crafted), "_target_")
    assert not marker.exists()
    assert not (tmp_path / "e" / "model.safetensors").exists()


# -- unreadable checkpoint files: said so, not blamed on code execution -----------------------
def unreadable(tiny_checkpoint: Path, kind: str) -> Path:
    path = tiny_checkpoint.parent / f"{kind}.ckpt"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        path.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    return path


@pytest.mark.parametrize("entry", [*CHECKPOINT_READERS, "load_model"])
def test_unreadable_checkpoint_is_described_as_such(
    entry: str, tiny_checkpoint: Path, tiny_config, forbidden_extractor, tmp_path: Path, monkeypatch
) -> None:
    """Random bytes and a truncated copy: "not a PyTorch checkpoint ... truncated", naming the
    file, never "would execute code"; train says so before decoding any data."""
    import flowerdiff.data.datamodule as datamodule

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the data was decoded before the checkpoint was checked")

    monkeypatch.setattr(datamodule, "load_or_build", no_decoding)
    run = entry_runner(entry, tmp_path, tiny_config, forbidden_extractor)
    for kind in ("random-bytes", "truncated"):
        path = unreadable(tiny_checkpoint, kind)
        with pytest.raises((CheckpointError, ConfigError)) as info:
            run(path)
        message = str(info.value)
        assert str(path) in message and "not a PyTorch checkpoint" in message, message
        assert "truncated" in message and "execute code" not in message, message


def test_truncated_checkpoint_says_which_file_and_what_to_do(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*last\.ckpt.* truncated") as info:
        read_checkpoint(path)
    assert "epoch_*.ckpt" in str(info.value)  # what to do instead


@pytest.mark.slow
def test_train_script_reports_an_unreadable_resume_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    path = unreadable(tiny_checkpoint, "random-bytes")
    done = script(
        "train",
        tmp_path,
        *TINY_OVERRIDES,
        f"data.root={tmp_path / 'images'}",
        f"paths.root_dir={tmp_path}",
        f"ckpt_path={path}",
    )
    assert_user_error(done, str(path), "not a PyTorch checkpoint")
    assert "execute code" not in done.stderr


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
