"""validate_train_config: one test per bad setting, asserting the key, the value and the valid
values; every problem at once; nothing heavy (no data decoding, no network, no module) first."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowerdiff.data.cache as cache
import flowerdiff.data.datamodule as datamodule
import flowerdiff.tasks.train as train_task
from flowerdiff.infra.config import ConfigError, Problems, check_output_dir, validate_train_config
from flowerdiff.tasks.train import train
from flowerdiff.training.spec import ModelSpec

from conftest import REPO_ROOT, TINY_OVERRIDES


def problems(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert message.startswith("The config has ")
    return message


@pytest.fixture
def no_decoding(monkeypatch) -> None:
    """Fail the test if any image is decoded."""

    def never(*args, **kwargs):
        raise AssertionError("images were decoded before the config was checked")

    monkeypatch.setattr(datamodule, "load_or_build", never)
    monkeypatch.setattr(cache, "decode_images", never)


def test_shipped_configs_pass_and_describe_the_model(tiny_config, no_decoding) -> None:
    spec = validate_train_config(tiny_config())
    assert isinstance(spec, ModelSpec)
    assert spec.image_shape == (3, 16, 16) and spec.network["hidden_dims"] == [16, 32, 32, 64]
    assert spec.diffusion["name"] == "ddpm" and spec.diffusion["sampler"]["name"] == "ddim"
    assert spec.diffusion["sampler"]["num_inference_steps"] == 4
    assert spec.class_names is None
    big = validate_train_config(
        tiny_config("model=unet_133m", "data.image_size=64", "data.batch_size=16")
    )
    assert big.image_shape == (3, 64, 64) and big.network["hidden_dims"] == [128, 256, 512, 1024]
    edm = validate_train_config(tiny_config("diffusion=edm", "sampler=heun"))
    assert edm.diffusion["name"] == "edm" and edm.diffusion["sampler"]["name"] == "heun"


def test_image_size_incompatible_with_unet_levels(tiny_config) -> None:
    message = problems(tiny_config("data.image_size=18"))
    assert "`data.image_size=18` does not fit the U-Net" in message
    assert "multiples of 4 (4, 8, 12, ...)" in message and "16 or 20" in message
    assert "model.net.hidden_dims=[16, 32, 32, 64]" in message


def test_num_inference_steps_above_num_timesteps(tiny_config) -> None:
    message = problems(
        tiny_config("sampler.num_inference_steps=20", "diffusion.schedule.num_timesteps=10")
    )
    assert "`sampler.num_inference_steps=20` exceeds `diffusion.schedule.num_timesteps=10`" in (
        message
    )
    assert "Valid values are 1 to 10" in message


def test_negative_eta(tiny_config) -> None:
    message = problems(tiny_config("sampler.eta=-0.5"))
    assert "`sampler.eta=-0.5` (or `eta=`) is invalid; it must be a number >= 0" in message


def test_unknown_sampler_name(tiny_config) -> None:
    message = problems(tiny_config("sampler.name=lms"))
    assert "`sampler.name='lms'` is not a known sampler" in message
    assert "'ddim', 'ddpm', 'dpm_solver', 'euler', 'heun'" in message


def test_sampler_key_left_over_from_another_sampler(tiny_config) -> None:
    message = problems(tiny_config("sampler.name=dpm_solver"))
    # conf/sampler/ddim.yaml's eta means nothing to DPM-Solver: say so instead of a TypeError.
    assert "`sampler.eta`" in message and "not parameters of DPMSolverSampler" in message
    assert "num_inference_steps, timestep_spacing" in message
    assert "~sampler.eta" in message  # the fix


def test_unknown_timestep_spacing(tiny_config) -> None:
    message = problems(tiny_config("sampler.timestep_spacing=uniform"))
    assert "`sampler.timestep_spacing='uniform'`" in message
    assert "'leading', 'trailing', 'linspace'" in message


def test_unknown_schedule_name(tiny_config) -> None:
    message = problems(tiny_config("diffusion.schedule.name=quadratic"))
    assert "`diffusion.schedule.name='quadratic'` is not a known noise schedule" in message
    assert "'cosine', 'cosine_clipped', 'linear', 'scaled_linear', 'sigmoid'" in message


def test_unknown_prediction_type(tiny_config) -> None:
    message = problems(tiny_config("diffusion.prediction=eps"))
    assert "`diffusion.prediction='eps'` is not a known prediction type" in message
    assert "'epsilon', 'v', 'x0'" in message


def test_unknown_loss_kind_and_weighting(tiny_config) -> None:
    message = problems(tiny_config("diffusion.loss.kind=mse"))
    assert (
        "`diffusion.loss.kind='mse'` is not a known loss. Valid values are 'l1', 'l2', 'huber'"
        in (message)
    )
    message = problems(tiny_config("diffusion.loss.weighting=snr"))
    assert "`diffusion.loss.weighting='snr'`" in message and "'none', 'min_snr'" in message


def test_epsilon_with_zero_terminal_snr(tiny_config) -> None:
    message = problems(tiny_config("diffusion.schedule.zero_terminal_snr=true"))
    assert "`diffusion.schedule.zero_terminal_snr=true` with `diffusion.prediction=epsilon`" in (
        message
    )
    validate_train_config(
        tiny_config("diffusion.schedule.zero_terminal_snr=true", "diffusion.prediction=v")
    )


def test_bad_edm_values(tiny_config) -> None:
    message = problems(tiny_config("diffusion=edm", "sampler=heun", "diffusion.sigma_data=-1"))
    assert "`diffusion.sigma_data=-1` must be a number > 0" in message


def test_misspelled_model_and_network_keys(tiny_config) -> None:
    message = problems(tiny_config("+model.prediction=v"))
    assert "`model.prediction` is not a model option" in message
    assert "net, compile, channels_last, label_dropout" in message
    message = problems(tiny_config("+model.net.hidden_dim=[8,16]"))
    assert "`model.net.hidden_dim` is not a parameter of UNet" in message


def test_network_sizes_are_checked_by_the_unet(tiny_config) -> None:
    """Sizes torch would refuse deep inside a layer are one paragraph naming the key."""
    message = problems(tiny_config("model.net.attn_heads=-2"))
    assert "`model.net.attn_heads=-2` must be a positive integer" in message


def test_label_dropout_out_of_range(tiny_config) -> None:
    message = problems(tiny_config("model.label_dropout=1.0"))
    assert "`model.label_dropout=1.0` must be in [0, 1)" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=-1e-3", "`optimizer.lr=-0.001` must be > 0: it is the learning rate"),
        ("optimizer.lr=0", "`optimizer.lr=0` must be > 0: it is the learning rate"),
        ("+optimizer.lrr=1", "`optimizer.lrr` is not a parameter of AdamW"),
        ("optimizer.betas=[0.9,1.5]", "`optimizer`: Invalid beta parameter at index 1: 1.5"),
        ("+lr_scheduler.warmup_step=3", "`lr_scheduler.warmup_step` is not a parameter"),
        ("data.max_images=0", "`data.max_images=0` must be null (every image) or an integer >= 1"),
        ("data.batch_size=0", "`data.batch_size=0` must be a positive integer"),
        ("+callbacks.nan_guard.skip=true", "`callbacks.nan_guard.skip` is not a parameter"),
        ("callbacks.ema._target_=lightning.EMA", "`callbacks.ema._target_='lightning.EMA'`"),
        ("trainer.gradient_clip_val=-1", "`trainer.gradient_clip_val=-1` must be a number >= 0"),
        ("trainer.gradient_clip_algorithm=max", "`trainer.gradient_clip_algorithm='max'` must be"),
        ("trainer.precision=auto_bf16", "`trainer.precision='auto_bf16'` is not a precision"),
    ],
)
def test_training_options_fail_before_any_data_is_decoded(
    override: str, expected: str, tiny_config, tmp_path: Path, monkeypatch, no_decoding
) -> None:
    """train() itself: one paragraph naming the key, before data, module or trainer exist."""

    def built(*args, **kwargs):
        raise AssertionError("train() built the module before validating the config")

    monkeypatch.setattr(train_task, "build_module", built)
    with pytest.raises(ConfigError) as info:
        train(tiny_config(override))
    message = str(info.value)
    assert message.startswith("The config has 1 problem; nothing was started.")
    assert expected in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_size_not_divisible_across_devices(tiny_config) -> None:
    message = problems(tiny_config("data.batch_size=6", "trainer.devices=2", "trainer.num_nodes=2"))
    assert "`data.batch_size=6` cannot be split evenly over 4 processes" in message
    assert "(trainer.devices=2 x trainer.num_nodes=2)" in message
    assert "multiples of 4; the nearest are 4 or 8" in message


def test_cpu_processes_may_exceed_core_count(tiny_config) -> None:
    # Chosen behaviour: on the CPU, devices are DDP processes, so any count is allowed.
    validate_train_config(tiny_config("trainer.devices=4", "data.batch_size=8"))


@pytest.fixture
def two_gpus(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_more_gpus_than_exist(tiny_config, two_gpus) -> None:
    message = problems(tiny_config("trainer.accelerator=gpu", "trainer.devices=4"))
    assert "`trainer.devices=4` asks for more GPUs than this machine has (2 visible)" in message
    assert "Valid values are 1 to 2" in message


def test_auto_accelerator_with_cuda_counts_gpus(tiny_config, two_gpus) -> None:
    message = problems(tiny_config("trainer.accelerator=auto", "trainer.devices=3"))
    assert "(2 visible)" in message
    message = problems(tiny_config("trainer.accelerator=cuda", "trainer.devices=[0,5]"))
    assert "names GPU id(s) [5] that do not exist" in message
    # 'auto' = both GPUs: the batch of 4 splits, a batch of 3 does not.
    validate_train_config(tiny_config("trainer.accelerator=gpu", "trainer.devices=auto"))
    message = problems(
        tiny_config("trainer.accelerator=gpu", "trainer.devices=auto", "data.batch_size=3")
    )
    assert "over 2 processes" in message


def test_gpu_accelerator_without_gpu(tiny_config, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    message = problems(tiny_config("trainer.accelerator=gpu"))
    assert "`trainer.accelerator='gpu'` needs a CUDA GPU, but none is visible" in message
    assert "trainer.accelerator=cpu" in message


def test_missing_resume_checkpoint(tiny_config, tmp_path) -> None:
    message = problems(tiny_config(f"ckpt_path={tmp_path}/nope.ckpt"))
    assert f"`ckpt_path='{tmp_path}/nope.ckpt'` does not exist" in message
    message = problems(tiny_config(f"ckpt_path={tmp_path}"))  # a folder (an export?)
    assert f"`ckpt_path='{tmp_path}'` is a folder; training resumes from a .ckpt file" in message
    validate_train_config(tiny_config("ckpt_path=last"))
    validate_train_config(tiny_config("ckpt_path=null"))


def test_unwritable_output_dir(tiny_config, tmp_path: Path, unwritable_dir: Path) -> None:
    message = problems(tiny_config(f"paths.output_dir={unwritable_dir}"))
    assert f"`paths.output_dir='{unwritable_dir}'` cannot be written" in message
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    message = problems(tiny_config(f"paths.output_dir={a_file / 'run'}"))
    assert f"`paths.output_dir='{a_file / 'run'}'` cannot be written: Not a directory" in message
    assert a_file.read_text() == "keep"


def test_output_check_leaves_nothing_behind(tmp_path: Path) -> None:
    found = Problems()
    check_output_dir(tmp_path / "a" / "b" / "c", "paths.output_dir", found)
    assert found.messages == [] and not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    check_output_dir(tmp_path / "kept", "out_dir", found)
    assert found.messages == [] and list(tmp_path.iterdir()) == [tmp_path / "kept"]


def test_all_problems_are_reported_at_once(tiny_config, no_decoding) -> None:
    message = problems(
        tiny_config(
            "sampler.eta=-1",
            "diffusion.schedule.name=x",
            "data.image_size=10",
            "optimizer.lr=0",
            "+callbacks.nan_guard.skip=true",
            "model.label_dropout=2",
        )
    )
    assert message.startswith("The config has 6 problems; nothing was started.")
    assert len(re.findall(r"^`", message, flags=re.MULTILINE)) == 6
    for key in (
        "sampler.eta",
        "diffusion.schedule.name",
        "data.image_size",
        "optimizer.lr",
        "callbacks.nan_guard.skip",
        "model.label_dropout",
    ):
        assert f"`{key}" in message, key


def test_validation_never_touches_the_network(tiny_config, monkeypatch, no_decoding) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("validate_train_config opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    validate_train_config(tiny_config("data=flowers102", "data.download=true", "logger=wandb"))
    validate_train_config(tiny_config("data=flowers102", "data.labels=true", "logger=many"))


def test_train_validates_before_building_anything(
    tiny_config, tmp_path, monkeypatch, no_decoding
) -> None:
    def built(*args, **kwargs):
        raise AssertionError("train() built the module before validating the config")

    monkeypatch.setattr(train_task, "build_module", built)
    with pytest.raises(ConfigError, match=r"`sampler\.eta=-1`"):
        train(tiny_config("sampler.eta=-1"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_train_script_prints_bad_options_as_one_paragraph(tmp_path: Path, image_folder) -> None:
    env = os.environ | {"FLOWERDIFF_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "train.py"),
            *TINY_OVERRIDES,
            f"data.root={image_folder}",
            f"paths.root_dir={tmp_path}",
            "optimizer.lr=-1e-3",
            "+optimizer.lrr=1",
            "data.max_images=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "Error: The config has 2 problems" in done.stderr  # lr is checked before its keys
    assert "`optimizer.lr=-0.001` must be > 0" in done.stderr
    assert "`data.max_images=0`" in done.stderr
