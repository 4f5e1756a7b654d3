"""validate_config: one test per bad setting, asserting the key, the value and the valid values."""

from __future__ import annotations

import re
import socket

import pytest
import torch

from flowerdiff.train import train
from flowerdiff.validation import ConfigError, validate_config


def problems(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return str(info.value)


def test_shipped_configs_pass(tiny_config) -> None:
    validate_config(tiny_config())
    validate_config(tiny_config("model=unet_133m", "data.image_size=64", "data.batch_size=16"))


def test_image_size_incompatible_with_unet_levels(tiny_config) -> None:
    message = problems(tiny_config("data.image_size=18"))
    assert "`data.image_size=18` does not fit the U-Net" in message
    assert "multiples of 4 (4, 8, 12, ...)" in message and "16 or 20" in message
    assert "model.net.hidden_dims=[16, 32, 32, 64]" in message


def test_num_inference_steps_above_num_timesteps(tiny_config) -> None:
    message = problems(tiny_config("sampler.num_inference_steps=20", "scheduler.num_timesteps=10"))
    assert "`sampler.num_inference_steps=20` exceeds `scheduler.num_timesteps=10`" in message
    assert "Valid values are 1 to 10" in message


def test_negative_eta(tiny_config) -> None:
    message = problems(tiny_config("sampler.eta=-0.5"))
    assert "`sampler.eta=-0.5` is invalid: it must be a number >= 0" in message


def test_unknown_sampler_class(tiny_config) -> None:
    message = problems(tiny_config("sampler._target_=flowerdiff.diffusion.EulerSampler"))
    assert (
        "`sampler._target_='flowerdiff.diffusion.EulerSampler'` is not a known sampler" in message
    )
    for valid in ("DDIMSampler", "DDPMSampler", "DPMSolverSampler"):
        assert f"flowerdiff.diffusion.{valid}" in message


def test_sampler_key_left_over_from_another_sampler(tiny_config) -> None:
    message = problems(tiny_config("sampler._target_=flowerdiff.diffusion.DPMSolverSampler"))
    # conf/sampler/ddim.yaml's eta means nothing to DPM-Solver: say so instead of a TypeError.
    assert "`sampler.eta` is not a parameter of DPMSolverSampler" in message
    assert "num_inference_steps, timestep_spacing" in message


def test_unknown_timestep_spacing(tiny_config) -> None:
    message = problems(tiny_config("sampler.timestep_spacing=uniform"))
    assert "`sampler.timestep_spacing='uniform'`" in message
    assert "'leading', 'trailing', 'linspace'" in message


def test_unknown_schedule_name(tiny_config) -> None:
    message = problems(tiny_config("scheduler.name=quadratic"))
    assert "`scheduler.name='quadratic'` is not a known noise schedule" in message
    assert "'cosine_clipped', 'linear', 'cosine', 'scaled_linear', 'sigmoid'" in message


def test_unknown_prediction_type(tiny_config) -> None:
    message = problems(tiny_config("model.prediction=eps"))
    assert "`model.prediction='eps'` is not a known prediction type" in message
    assert "'epsilon', 'v', 'x0'" in message


def test_unknown_loss_kind_and_weighting(tiny_config) -> None:
    message = problems(tiny_config("model.loss.kind=mse", "model.loss.weighting=snr"))
    assert "`model.loss.kind='mse'` is not a known loss. Valid values are 'l1', 'l2', 'huber'" in (
        message
    )
    assert "`model.loss.weighting='snr'`" in message and "'none', 'min_snr'" in message


def test_batch_size_not_divisible_across_devices(tiny_config) -> None:
    message = problems(tiny_config("data.batch_size=6", "trainer.devices=2", "trainer.num_nodes=2"))
    assert "`data.batch_size=6` cannot be split evenly over 4 processes" in message
    assert "(trainer.devices=2 x trainer.num_nodes=2)" in message
    assert "multiples of 4; the nearest are 4 or 8" in message


def test_cpu_processes_may_exceed_core_count(tiny_config) -> None:
    # Chosen behaviour: on the CPU, devices are DDP processes, so any count is allowed.
    validate_config(tiny_config("trainer.devices=4", "data.batch_size=8"))


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
    validate_config(tiny_config("trainer.accelerator=gpu", "trainer.devices=auto"))
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
    validate_config(tiny_config("ckpt_path=last"))


def test_all_problems_are_reported_at_once(tiny_config) -> None:
    message = problems(tiny_config("sampler.eta=-1", "scheduler.name=x", "data.image_size=10"))
    assert message.startswith("The config has 3 problems; nothing was started.")
    assert len(re.findall(r"^`", message, flags=re.MULTILINE)) == 3


def test_validation_never_touches_the_network(tiny_config, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("validate_config opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    validate_config(tiny_config("data=flowers102", "data.download=true", "logger=wandb"))


def test_train_validates_before_building_anything(tiny_config, tmp_path, monkeypatch) -> None:
    import flowerdiff.train as train_module

    def built(*args, **kwargs):
        raise AssertionError("train() built the module before validating the config")

    monkeypatch.setattr(train_module, "build_module", built)
    with pytest.raises(ConfigError, match=r"`sampler\.eta=-1`"):
        train(tiny_config("sampler.eta=-1"))
    assert not (tmp_path / "run" / "checkpoints").exists()
