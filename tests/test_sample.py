"""sample(cfg) / scripts/sample.py on a checkpoint written here: files, sizes, reproducibility,
and every bad input reported as one paragraph before any work (issue 15, section 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flowerdiff.tasks.sample as sample_task
from flowerdiff.diffusion import build_sampler
from flowerdiff.infra.config import ConfigError, configured_sampler
from flowerdiff.infra.exports import load_model
from flowerdiff.tasks.sample import sample

from conftest import REPO_ROOT, compose_config


def sample_config(checkpoint: Path, out_dir: Path, *overrides: str):
    return compose_config(
        [f"ckpt_path={checkpoint}", f"out_dir={out_dir}", "device=cpu", *overrides],
        config_name="sample",
        output_dir=out_dir,
    )


def run_sample(checkpoint: Path, out_dir: Path, *overrides: str) -> dict:
    return sample(sample_config(checkpoint, out_dir, *overrides))


def pixels(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in paths]


def test_sample_writes_images_grid_strip_and_gif(tiny_checkpoint: Path, tmp_path: Path) -> None:
    common = ("num_images=5", "sampler=ddim", "steps=4", "eta=1.0", "trajectory_images=2")
    a = run_sample(tiny_checkpoint, tmp_path / "a", *common, "seed=3", "batch_size=2")
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == [
        f"{i:05d}.png" for i in range(5)
    ]
    assert all(Image.open(p).size == (16, 16) for p in a["images"])
    assert Image.open(a["grid"]).size == (2 + 2 * 18, 2 + 3 * 18)  # 5 images, 2 per row
    # 5 columns (t = 750, 500, 500, 250, 0 for 4 steps), 2 samples x (x_t, x0) rows
    assert Image.open(a["trajectory"]).size == (2 + 5 * 18, 2 + 4 * 18)
    gif = Image.open(a["gif"])
    assert gif.n_frames == 4 and gif.size == (2 + 2 * 18, 2 + 2 * 18)

    # Same seed, other batch split: the same images; another seed: other images.
    b = run_sample(tiny_checkpoint, tmp_path / "b", *common, "seed=3", "batch_size=5")
    c = run_sample(tiny_checkpoint, tmp_path / "c", *common, "seed=4", "batch_size=5")
    for x, y, z in zip(pixels(a["images"]), pixels(b["images"]), pixels(c["images"]), strict=True):
        assert np.array_equal(x, y)
        assert not np.array_equal(x, z)


def test_steps_and_eta_shortcuts_build_a_new_sampler(tiny_checkpoint: Path) -> None:
    module = load_model(tiny_checkpoint)
    own = module.diffusion.sampler
    before = own.to_config()
    sampler = configured_sampler(module.diffusion, {"name": "ddim"}, steps=7, eta=0.0)
    assert (sampler.num_inference_steps, sampler.eta) == (7, 0.0)
    changed = configured_sampler(module.diffusion, None, steps=3)
    assert changed.num_inference_steps == 3 and changed is not own
    assert module.diffusion.sampler is own and own.to_config() == before  # never mutated
    assert configured_sampler(module.diffusion) is own
    with pytest.raises(ValueError, match=r"`eta=0\.5` only applies to DDIM.*sampler=ddim"):
        configured_sampler(module.diffusion, {"name": "ddpm", "num_inference_steps": 10}, eta=0.5)
    with pytest.raises(ValueError, match=r"num_inference_steps=2000"):  # more steps than T
        configured_sampler(module.diffusion, build_sampler({"name": "ddim"}).to_config(), 2000)


def test_sampler_choice_and_raw_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``sampler=euler`` replaces the model's DDIM; ``weights=raw`` picks the training weights."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    raw = {k: v + 0.05 * torch.randn_like(v) for k, v in checkpoint["state_dict"].items()}
    checkpoint["current_model_state"] = raw
    torch.save(checkpoint, tiny_checkpoint)
    common = ("num_images=2", "trajectory_images=0", "steps=2")
    ema = pixels(run_sample(tiny_checkpoint, tmp_path / "ema", *common)["images"])
    again = pixels(run_sample(tiny_checkpoint, tmp_path / "ema2", *common, "weights=ema")["images"])
    trained = pixels(
        run_sample(tiny_checkpoint, tmp_path / "raw", *common, "weights=raw")["images"]
    )
    euler = pixels(run_sample(tiny_checkpoint, tmp_path / "eu", *common, "sampler=euler")["images"])
    assert all(np.array_equal(x, y) for x, y in zip(ema, again, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(ema, trained, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(ema, euler, strict=True))


# -- every bad input: one paragraph naming the key, before the model is used ------------------
@pytest.fixture
def no_sampling(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr(sample_task, "sample_batches", never)


def problem(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        sample(cfg)
    message = str(info.value)
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("steps=0", "`sampler.num_inference_steps=0` (or `steps=`) is invalid"),
        ("steps=-3", "`sampler.num_inference_steps=-3` (or `steps=`) is invalid"),
        ("eta=-1", "`sampler.eta=-1` (or `eta=`) is invalid; it must be a number >= 0"),
        ("num_images=0", "`num_images=0` must be an integer >= 1"),
        ("batch_size=0", "`batch_size=0` must be an integer >= 1"),
        ("trajectory_images=-1", "`trajectory_images=-1` must be an integer >= 0"),
        ("sampler=heun", "`eta=1.0` only applies to DDIM"),
        ("class_labels=[1,2]", "class_labels were given, but this model is unconditional"),
        ("guidance_scale=3", "`guidance_scale` applies to class-conditional models"),
        ("precision=fp8", "`precision='fp8'` is not a precision flowerdiff runs"),
        ("device=tpu", "`device='tpu'` is not a device"),
    ],
)
def test_bad_value_is_one_paragraph_before_sampling(
    override: str, expected: str, tiny_checkpoint: Path, tmp_path: Path, no_sampling
) -> None:
    extra = ("eta=1.0",) if override == "sampler=heun" else ()
    message = problem(sample_config(tiny_checkpoint, tmp_path / "out", override, *extra))
    assert expected in message
    assert not (tmp_path / "out" / "images").exists()


def test_all_problems_are_reported_at_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    message = problem(
        sample_config(tiny_checkpoint, tmp_path / "o", "num_images=0", "batch_size=0", "device=x")
    )
    assert message.startswith("The config has 3 problems; nothing was started.")


def test_cuda_without_a_gpu_names_device_not_the_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded although the device does not exist")

    monkeypatch.setattr(sample_task, "load_model", never)
    for device in ("cuda", "cuda:1"):
        message = problem(sample_config(tiny_checkpoint, tmp_path / "out", f"device={device}"))
        assert f"`device='{device}'` asks for a CUDA GPU, but none is visible" in message
        assert "device=cpu" in message  # the fix
        assert str(tiny_checkpoint) not in message and "checkpoint" not in message


@pytest.mark.parametrize("where", ["missing", "nowhere"])
def test_missing_model_names_ckpt_path(where: str, tmp_path: Path) -> None:
    path = "null" if where == "missing" else str(tmp_path / "no-such.ckpt")
    message = problem(sample_config(Path(path), tmp_path / "out"))
    assert (
        "`ckpt_path` is missing" in message if where == "missing" else "does not exist" in message
    )


def test_output_folder_that_is_a_file_or_unwritable(
    tiny_checkpoint: Path, tmp_path: Path, unwritable_dir: Path, no_sampling
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for out_dir in (a_file, a_file / "below", unwritable_dir):
        message = problem(sample_config(tiny_checkpoint, out_dir))
        assert f"`out_dir='{out_dir}'` cannot be written" in message
        assert "Choose a folder you can write to" in message
    assert a_file.read_text() == "not a folder"


def script_env(tmp_path: Path) -> dict[str, str]:
    env = os.environ | {"FLOWERDIFF_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.mark.slow
def test_sample_script_command_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "sample.py")]
    command += [f"ckpt_path={tiny_checkpoint}", "num_images=3", "sampler=ddim", "steps=3"]
    command += ["eta=0.5", "seed=1", f"out_dir={out}"]
    done = subprocess.run(
        command, cwd=tmp_path, env=script_env(tmp_path), timeout=300, capture_output=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "images").glob("*.png"))) == 3
    assert {p.name for p in out.iterdir()} >= {"grid.png", "trajectory.png", "trajectory.gif"}


@pytest.mark.slow
def test_sample_script_prints_one_paragraph(tiny_checkpoint: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "scripts" / "sample.py")]
    command += [f"ckpt_path={tiny_checkpoint}", "steps=0", f"out_dir={tmp_path / 'out'}"]
    done = subprocess.run(
        command, cwd=tmp_path, env=script_env(tmp_path), timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ZeroDivisionError" not in done.stderr
    assert "Error: The config has 1 problem" in done.stderr
    assert "`sampler.num_inference_steps=0` (or `steps=`) is invalid" in done.stderr
