"""Precision and speed options: bf16 autocast on the CPU (training and sampling), channels_last,
precision `auto`, the one autocast mapping, and the GPU-only switches (fused AdamW, TF32,
compile) staying harmless where they do not apply."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from flowerdiff.infra import devices
from flowerdiff.infra.checkpoints import read_checkpoint
from flowerdiff.infra.config import build_module
from flowerdiff.infra.devices import autocast_context, resolve_precision
from flowerdiff.models.unet import UNet
from flowerdiff.tasks.train import enable_tf32, train


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


def test_native_cpu_bf16_is_onednns_check() -> None:
    assert devices.native_cpu_bf16() == (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


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


def test_compile_keeps_state_dict_keys_and_fused_adamw_only_on_cuda(tiny_config) -> None:
    plain = build_module(tiny_config())
    compiled = build_module(tiny_config("model.compile=true"))
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    # Weights load across the two: a compiled run's checkpoint serves an uncompiled sampler.
    plain.load_state_dict(compiled.state_dict())

    assert plain._fused_kwargs() == {}  # on the CPU
    plain._device = torch.device("cuda", 0)  # what Lightning sets after moving the module
    assert plain._fused_kwargs() == {"fused": True}
    explicit = build_module(tiny_config("+optimizer.fused=false"))
    explicit._device = torch.device("cuda", 0)
    assert explicit._fused_kwargs() == {}


def test_tf32_is_a_no_op_on_cpu() -> None:
    before = torch.get_float32_matmul_precision()
    enable_tf32()
    assert torch.get_float32_matmul_precision() == before
