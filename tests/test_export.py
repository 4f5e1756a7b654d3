"""scripts/export.py: (EMA) weights as safetensors + the model description as YAML, loaded back
by load_model; export(cfg) checks its two paths before reading anything."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from flowerdiff.callbacks.ema import reconstruct_posthoc
from flowerdiff.diffusion.samplers import EulerSampler
from flowerdiff.infra.checkpoints import CheckpointError, checkpoint_spec, read_checkpoint
from flowerdiff.infra.config import ConfigError, RunDirCheck, build_module
from flowerdiff.infra.exports import export_checkpoint, load_model, read_export
from flowerdiff.tasks.export import export
from flowerdiff.tasks.sample import sample
from flowerdiff.training.spec import SPEC_KEYS, ModelSpec

from conftest import REPO_ROOT, compose_config


@pytest.fixture
def checkpoint(tiny_config, tmp_path: Path) -> tuple[Path, dict, dict]:
    """A checkpoint laid out as Lightning + EMAWeightAveraging write it: the EMA weights in
    ``state_dict``, the raw ones in ``current_model_state``."""
    torch.manual_seed(0)
    module = build_module(tiny_config())
    raw = module.state_dict()
    ema = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in raw.items()
    }
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": ema,
            "current_model_state": raw,
            "flowerdiff": module.spec.to_dict(),
            "global_step": 42,
            "epoch": 3,
        },
        path,
    )
    return path, ema, raw


def test_round_trip_gives_the_same_samples(checkpoint, tmp_path: Path) -> None:
    path, ema, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    original = load_model(path)
    for source in (out, out / "model.safetensors"):
        exported = load_model(source)
        for name, value in exported.net.state_dict().items():
            assert torch.equal(value, ema[f"net.{name}"]), name  # the EMA weights, exactly
        assert exported.spec == original.spec
        assert torch.equal(original.sample(2, seed=5).images, exported.sample(2, seed=5).images)
        assert exported.diffusion.sampler.num_inference_steps == 4 and not exported.training


def test_every_source_describes_the_same_model(checkpoint, tmp_path: Path) -> None:
    path, _, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    stored = checkpoint_spec(read_checkpoint(path), path)
    for source in (out, out / "model.safetensors"):
        _, description, _ = read_export(source)
        assert ModelSpec.from_dict(description) == stored


def test_config_yaml_describes_the_model_and_its_origin(checkpoint, tmp_path: Path) -> None:
    path, _, _ = checkpoint
    config = yaml.safe_load((export_checkpoint(path, tmp_path / "e") / "config.yaml").read_text())
    assert set(config) == {"model", "export"}  # no data, optimizer or trainer config
    model = config["model"]
    assert set(model) == set(SPEC_KEYS) and model["format"] == "flowerdiff-model/2"
    assert model["network"]["name"] == "unet"
    assert model["network"]["hidden_dims"] == [16, 32, 32, 64]
    assert model["diffusion"]["schedule"]["name"] == "cosine_clipped"
    assert model["diffusion"]["sampler"]["name"] == "ddim"
    assert model["image_shape"] == [3, 16, 16]
    info = config["export"]
    assert info["ema_weights"] is True and info["global_step"] == 42 and info["epoch"] == 3
    assert info["source_checkpoint"] == str(path.resolve())


def test_lone_safetensors_file_and_edited_yaml(checkpoint, tmp_path: Path) -> None:
    path, _, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    alone = tmp_path / "alone" / "weights.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((out / "model.safetensors").read_bytes())
    lone = load_model(alone)  # the description from the metadata
    assert lone.diffusion.sampler.num_inference_steps == 4
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["model"]["diffusion"]["sampler"] = {"name": "euler", "num_inference_steps": 2}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    edited = load_model(out)  # the YAML beside the weights wins
    assert isinstance(edited.diffusion.sampler, EulerSampler)
    assert edited.diffusion.sampler.num_inference_steps == 2
    assert not torch.equal(edited.sample(1, seed=0).images, lone.sample(1, seed=0).images)
    # ... and so do the scripts: sample.py uses the edited default sampler.
    cfg = compose_config(
        [f"ckpt_path={out}", f"out_dir={tmp_path / 's'}", "device=cpu", "num_images=1"],
        config_name="sample",
        output_dir=tmp_path / "s",
    )
    sample(cfg)
    assert Image.open(tmp_path / "s" / "trajectory.gif").n_frames == 2  # one per Euler step


def test_raw_weights_are_the_training_weights(checkpoint, tmp_path: Path) -> None:
    path, ema, raw = checkpoint
    trained = load_model(path, weights="raw")
    averaged = load_model(path, weights="ema")
    for name, value in trained.net.state_dict().items():
        assert torch.equal(value, raw[f"net.{name}"]), name
        assert torch.equal(averaged.net.state_dict()[name], ema[f"net.{name}"]), name
    assert not torch.equal(trained.sample(1, seed=0).images, averaged.sample(1, seed=0).images)
    out = export_checkpoint(path, tmp_path / "e")
    with pytest.raises(CheckpointError, match=r"is an export, which holds one set of weights"):
        load_model(out, weights="raw")
    single = torch.load(path, weights_only=True)
    del single["current_model_state"]
    torch.save(single, tmp_path / "no-ema.ckpt")
    with pytest.raises(CheckpointError, match=r"no-ema\.ckpt.*one set of weights.*weights=ema"):
        load_model(tmp_path / "no-ema.ckpt", weights="raw")
    with pytest.raises(ValueError, match=r"`weights='best'` must be one of ema, raw"):
        load_model(path, weights="best")


def test_bad_exports_fail_with_clear_messages(checkpoint, tmp_path: Path) -> None:
    path, _, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"Could not read .*model\.safetensors.* truncated"):
        load_model(out)
    empty = tmp_path / "folder-without-weights"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors"):
        load_model(empty)
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"is not a flowerdiff export"):
        load_model(tmp_path / "other.safetensors")


def test_export_of_weights_that_do_not_fit_is_refused(checkpoint, tmp_path: Path) -> None:
    """A weight renamed in the safetensors file: refused naming the file, nothing built."""
    path, _, _ = checkpoint
    out = export_checkpoint(path, tmp_path / "e")
    with safe_open(out / "model.safetensors", framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    tensors["extra.weight"] = tensors.pop("conv_out.weight")
    save_file(tensors, out / "model.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"do not fit the model.*conv_out\.weight"):
        load_model(out)
    assert json.loads(metadata["model"])["network"]["name"] == "unet"


# -- export(cfg): both paths checked first, every problem at once -----------------------------
def export_config(tmp_path: Path, *overrides: str):
    return compose_config(list(overrides), config_name="export", output_dir=tmp_path / "hydra")


def test_export_task_writes_the_export(checkpoint, tmp_path: Path) -> None:
    path, _, _ = checkpoint
    out = export(export_config(tmp_path, f"ckpt_path={path}", f"out_dir={tmp_path / 'x'}"))
    assert load_model(out).sample(1, seed=0).images.isfinite().all()


def test_export_without_arguments_names_both_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        export(export_config(tmp_path))
    message = str(info.value)
    assert message.startswith("The config has 2 problems; nothing was started.")
    assert "`ckpt_path` is missing" in message and "`out_dir` is missing" in message


def test_export_needs_a_checkpoint_file(checkpoint, tmp_path: Path) -> None:
    path, _, _ = checkpoint
    exported = export_checkpoint(path, tmp_path / "e")
    for wrong in (tmp_path / "nope.ckpt", exported, exported / "model.safetensors"):
        with pytest.raises(ConfigError, match=r"is not a checkpoint file") as info:
            export(export_config(tmp_path, f"ckpt_path={wrong}", f"out_dir={tmp_path / 'x'}"))
        assert f"`ckpt_path='{wrong}'`" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_export_to_a_file_or_unwritable_folder(
    checkpoint, tmp_path: Path, unwritable_dir: Path
) -> None:
    path, _, _ = checkpoint
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    for out_dir in (a_file, a_file / "below", unwritable_dir):
        with pytest.raises(ConfigError) as info:
            export(export_config(tmp_path, f"ckpt_path={path}", f"out_dir={out_dir}"))
        assert f"`out_dir='{out_dir}'` cannot be written" in str(info.value)
    assert a_file.read_text() == "keep"


@pytest.mark.parametrize("entry", ["sample", "evaluate", "export"])
def test_unwritable_hydra_run_dir_is_one_paragraph(
    entry: str, tmp_path: Path, unwritable_dir: Path, capsys
) -> None:
    """Hydra creates the run folder before the task starts; the entry configs' RunDirCheck
    callback reports an unwritable one first (exit status 1, no traceback)."""
    cfg = compose_config([f"hydra.run.dir={unwritable_dir}"], entry, output_dir=tmp_path)
    callbacks = [instantiate(node) for node in cfg.hydra.callbacks.values()]
    assert [type(c) for c in callbacks] == [RunDirCheck]
    with pytest.raises(SystemExit) as info:
        callbacks[0].on_run_start(config=cfg)
    assert info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith(f"Error: `hydra.run.dir='{unwritable_dir}'` cannot be written")
    fine = compose_config([f"hydra.run.dir={tmp_path / 'run'}"], entry, output_dir=tmp_path)
    callbacks[0].on_run_start(config=fine)
    assert not (tmp_path / "run").exists()  # checked, not left behind


def run_script(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"FLOWERDIFF_ROOT": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides = (*overrides, f"hydra.run.dir={tmp_path / 'hydra'}")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "export.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.mark.slow
def test_export_script(checkpoint, tmp_path: Path) -> None:
    path, _, _ = checkpoint
    out = tmp_path / "cli"
    done = run_script(tmp_path, f"ckpt_path={path}", f"out_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_model(out).sample(1, seed=0).images.isfinite().all()


@pytest.mark.slow
def test_export_script_without_arguments(tmp_path: Path) -> None:
    done = run_script(tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "MissingMandatoryValue" not in done.stderr
    assert "Error: The config has 2 problems" in done.stderr
    assert "`ckpt_path` is missing" in done.stderr and "`out_dir` is missing" in done.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    done = run_script(tmp_path, f"hydra.run.dir={a_file / 'run'}")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"Error: `hydra.run.dir='{a_file / 'run'}'` cannot be written" in done.stderr


# -- post-hoc EMA: export the EMA of a length chosen after training ----------------------------
@pytest.fixture
def posthoc_run(checkpoint, tmp_path: Path) -> tuple[Path, Path]:
    """A run folder as training with callbacks.ema.posthoc_sigma_rels leaves it:
    ``checkpoints/last.ckpt`` (its EMA at update 40) beside ``posthoc_ema/`` with both profiles
    at updates 20, 40 and 60 (the last from after the checkpoint)."""
    path, ema, _ = checkpoint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stored = torch.load(path, weights_only=True)
    stored["callbacks"] = {"EMA{'kind': 'power'}": {"num_updates": 40}}
    torch.save(stored, run / "checkpoints" / "last.ckpt")
    folder = run / "posthoc_ema"
    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    for updates in (20, 40, 60):
        for sigma_rel in (0.05, 0.10):
            state = {
                k: v + 0.1 * torch.randn(v.shape, generator=generator)
                if v.is_floating_point()
                else v
                for k, v in ema.items()
            }
            torch.save(
                {"state_dict": state, "updates": updates, "sigma_rel": sigma_rel},
                folder / f"ema-{updates:09d}-{sigma_rel:.4f}.pt",
            )
    return run / "checkpoints" / "last.ckpt", folder


def test_export_rebuilds_the_posthoc_ema_as_of_the_checkpoint(posthoc_run, tmp_path: Path) -> None:
    path, folder = posthoc_run
    out = export(
        export_config(
            tmp_path, f"ckpt_path={path}", f"out_dir={tmp_path / 'x'}", "posthoc_sigma_rel=0.07"
        )
    )
    expected = reconstruct_posthoc(folder, 0.07, updates=40)  # not 60: after the checkpoint
    assert expected.keys() == {f"net.{name}" for name in load_model(out).net.state_dict()}
    for name, value in load_model(out).net.state_dict().items():
        torch.testing.assert_close(value, expected[f"net.{name}"], rtol=0, atol=1e-6)
    info = yaml.safe_load((out / "config.yaml").read_text())["export"]
    assert info["posthoc_ema"] == {"sigma_rel": 0.07, "updates": 40, "folder": str(folder)}
    # A stored length at the checkpoint's update is that snapshot (the least squares is exact).
    other = export_checkpoint(path, tmp_path / "y", (folder, 0.10))
    snapshot = torch.load(folder / "ema-000000040-0.1000.pt", weights_only=True)["state_dict"]
    for name, value in load_model(other).net.state_dict().items():
        torch.testing.assert_close(value, snapshot[f"net.{name}"], rtol=0, atol=1e-4)


def test_posthoc_export_inputs_are_checked_first(posthoc_run, tmp_path: Path) -> None:
    path, folder = posthoc_run
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "posthoc_sigma_rel=0.5": "`posthoc_sigma_rel=0.5` must be in (0, 0.2887)",
        "posthoc_sigma_rel=abc": "`posthoc_sigma_rel='abc'` must be in",
        f"posthoc_dir={folder}": "`posthoc_sigma_rel` is null: pass the EMA length",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=re.escape(expected)):
            export(
                export_config(tmp_path, f"ckpt_path={path}", f"out_dir={tmp_path / 'x'}", override)
            )
    with pytest.raises(ConfigError, match=re.escape(f"but '{empty}' holds none")):
        export(
            export_config(
                tmp_path,
                f"ckpt_path={path}",
                f"out_dir={tmp_path / 'x'}",
                "posthoc_sigma_rel=0.07",
                f"posthoc_dir={empty}",
            )
        )
    assert not (tmp_path / "x").exists()


def test_posthoc_snapshots_from_elsewhere_are_refused(
    posthoc_run, tiny_config, tmp_path: Path
) -> None:
    """Snapshots are files like any checkpoint: one that pickles a call is refused before it
    runs; another model's, or a checkpoint older than every snapshot, is one clear message."""
    from test_reliability import pickled_checkpoint

    path, folder = posthoc_run
    marker = tmp_path / "pwned"
    evil = pickled_checkpoint(tmp_path, "torch.save", marker)
    evil.rename(folder / "ema-000000030-0.0500.pt")
    with pytest.raises(CheckpointError, match="could execute code"):
        export_checkpoint(path, tmp_path / "x", (folder, 0.07))
    assert not marker.exists() and not (tmp_path / "x").exists()
    (folder / "ema-000000030-0.0500.pt").unlink()

    other = build_module(tiny_config("model.net.hidden_dims=[8,16,16,32]")).state_dict()
    torch.save({"state_dict": other}, folder / "ema-000000030-0.0500.pt")
    with pytest.raises(CheckpointError, match="the folder mixes two models"):
        export_checkpoint(path, tmp_path / "x", (folder, 0.07))
    torch.save({"state_dict": {"weights": [1, 2]}}, folder / "ema-000000030-0.0500.pt")
    with pytest.raises(CheckpointError, match="is not a post-hoc EMA snapshot"):
        export_checkpoint(path, tmp_path / "x", (folder, 0.07))
    (folder / "ema-000000030-0.0500.pt").unlink()

    early = torch.load(path, weights_only=True)
    early["callbacks"] = {"EMA": {"num_updates": 10}}
    torch.save(early, tmp_path / "early.ckpt")
    with pytest.raises(CheckpointError, match=r"no post-hoc EMA snapshots from before .*update 10"):
        export_checkpoint(tmp_path / "early.ckpt", tmp_path / "x", (folder, 0.07))
    assert not (tmp_path / "x").exists()
