"""Precision and speed options: bf16 autocast on the CPU (training and sampling), channels_last,
precision `auto`, the one autocast mapping, and the GPU-only switches (fused AdamW, TF32,
compile) staying harmless where they do not apply."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import pytest
import torch

from flowerdiff.infra import devices
from flowerdiff.infra.checkpoints import read_checkpoint
from flowerdiff.infra.config import build_module
from flowerdiff.infra.devices import autocast_context, resolve_precision
from flowerdiff.models.unet import UNet
from flowerdiff.tasks.train import enable_tf32, train
from flowerdiff.training.module import fused_kwargs


def test_bf16_mixed_channels_last_trains_on_cpu_without_nan(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bool, torch.dtype, bool]] = []
    forward = UNet.forward

    def recording(self: UNet, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = forward(self, sample, *args, **kwargs)
        channels_last = sample.is_contiguous(memory_format=torch.channels_last)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype, channels_last))
        return out

    monkeypatch.setattr(UNet, "forward", recording)
    metrics = train(tiny_config("trainer.precision=bf16-mixed", "model.channels_last=true"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # Every forward pass (training, validation, the callbacks' sampling) ran under bf16
    # autocast on channels_last input.
    assert seen and set(seen) == {(True, torch.bfloat16, True)}
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    weights = checkpoint["current_model_state"]
    assert all(w.isfinite().all() for w in weights.values() if w.is_floating_point())
    # The master weights stay float32 under mixed precision.
    assert weights["net.time_mlp.0.weight"].dtype == torch.float32


def test_autocast_context_is_the_trainers_mapping() -> None:
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("bf16-mixed", cpu)():
        assert (a @ b).dtype == torch.bfloat16
    for precision in ("32-true", "auto", 32):
        assert autocast_context(precision, cpu) is contextlib.nullcontext
    with pytest.raises(ValueError, match=r"`precision='8-bit'` is not a precision flowerdiff runs"):
        autocast_context("8-bit", cpu)


def test_precision_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "auto") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "auto") == "16-mixed"


@pytest.mark.parametrize("native", [True, False])
def test_auto_bf16_follows_the_cpus_native_bf16(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU recipes' precision: bf16 autocast only where oneDNN has native bf16 kernels,
    float32 where bf16 convolutions would be emulated; plain ``auto`` stays float32 on a CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: native)
    expected = "bf16-mixed" if native else "32-true"
    assert resolve_precision("auto-bf16", "cpu") == expected
    assert resolve_precision("auto-bf16", "auto") == expected
    assert resolve_precision("auto", "cpu") == "32-true"
    cpu = torch.device("cpu")
    context = autocast_context("auto-bf16", cpu)
    assert (context is contextlib.nullcontext) is not native
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto-bf16", "gpu") == "16-mixed"  # on a GPU, auto's choice


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
    reason="reads the x86 CPU flags from /proc/cpuinfo (Linux on x86 only)",
)
def test_native_cpu_bf16_follows_the_cpus_avx512_flags() -> None:
    """Checked against the kernel's view of the CPU, not against the call it makes: oneDNN's bf16
    kernels need AVX-512 BW, VL and DQ (PyTorch's mkldnn_bf16_device_check). On the AVX2-only
    EPYC this suite runs on, both sides are False."""
    assert devices.native_cpu_bf16() == ({"avx512bw", "avx512vl", "avx512dq"} <= cpu_flags())


def test_the_precisions_we_accept_are_lightnings_and_run() -> None:
    """Every name the check accepts is one Lightning's Trainer accepts (a Lightning upgrade that
    drops one fails here); Lightning's aliases, which the race's like-for-like check would miss,
    and the half and double *-true precisions, which stop a run with a dtype error, are refused
    naming the key."""
    from typing import get_args

    from lightning.fabric import connector

    lightning = {
        str(value) for alias in get_args(connector._PRECISION_INPUT) for value in get_args(alias)
    }
    assert set(devices.SUPPORTED_PRECISIONS) <= lightning
    for name in devices.AUTO_PRECISIONS + devices.SUPPORTED_PRECISIONS:
        devices.check_precision(name)
    for name in ("bf16", "16", "16-true", "bf16-true", "64-true", 64, "transformer-engine", "x"):
        with pytest.raises(ValueError, match=rf"`trainer.precision={name!r}` is not a precision"):
            devices.check_precision(name)


def test_compile_keeps_state_dict_keys(tiny_config) -> None:
    plain = build_module(tiny_config())
    compiled = build_module(tiny_config("model.compile=true"))
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    # Weights load across the two: a compiled run's checkpoint serves an uncompiled sampler.
    plain.load_state_dict(compiled.state_dict())


def test_adamw_is_fused_unless_lightning_must_unscale_or_the_config_says(tiny_config) -> None:
    factory = build_module(tiny_config()).optimizer_factory
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert fused_kwargs(factory, cpu, "32-true") == {"fused": True}
    assert fused_kwargs(factory, cuda, "bf16-mixed") == {"fused": True}
    assert fused_kwargs(factory, cpu, "32-true", clipping=True) == {"fused": True}
    # Lightning clips no fused optimizer under mixed precision; under 16-mixed its GradScaler
    # must also unscale before the logged gradient norm.
    assert fused_kwargs(factory, cuda, "bf16-mixed", clipping=True) == {}
    assert fused_kwargs(factory, cuda, "16-mixed") == {}
    assert fused_kwargs(factory, torch.device("meta"), None) == {}
    explicit = build_module(tiny_config("+optimizer.fused=false")).optimizer_factory
    assert fused_kwargs(explicit, cpu, "32-true") == {}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_with_clipping_gets_fused_adamw_except_under_mixed_precision(
    tiny_config, precision: str
) -> None:
    """Lightning refuses gradient clipping for an optimizer that unscales inside its own step
    under mixed precision, so such a run must get the unfused AdamW; a float32 one the fused."""
    import lightning as L
    from hydra.utils import instantiate

    cfg = tiny_config(f"trainer.precision={precision}")
    module = build_module(cfg)
    seen: list[bool] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(bool(trainer.optimizers[0].defaults["fused"]))

    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        gradient_clip_val=1.0,
        max_steps=2,
        callbacks=[Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert seen == [precision == "32-true"] * 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_explicit_fused_adamw_with_clipping_under_mixed_precision_is_refused_before_training(
    tiny_config,
) -> None:
    """Lightning would stop such a run only at its first step, after the data load: the config
    check names optimizer.fused before anything is built. Float32 clips a fused AdamW fine."""
    import lightning as L
    from hydra.utils import instantiate

    from flowerdiff.infra.config import ConfigError, validate_train_config

    clipped = ("trainer.gradient_clip_val=1.0", "+optimizer.fused=true")
    validate_train_config(tiny_config(*clipped, "trainer.precision=32-true"))
    cfg = tiny_config(*clipped, "trainer.precision=bf16-mixed")
    with pytest.raises(ConfigError, match=r"`optimizer.fused=true` with `trainer.gradient_clip"):
        validate_train_config(cfg)
    trainer = L.Trainer(  # what the check saves the user from
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(Exception, match="does not allow for gradient clipping"):
        trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))


def test_tf32_is_a_no_op_on_cpu() -> None:
    before = torch.get_float32_matmul_precision()
    enable_tf32()
    assert torch.get_float32_matmul_precision() == before
