"""Precision and speed options: bf16-mixed on the CPU, precision `auto`, and the GPU-only
switches (fused AdamW, TF32, compile) staying harmless where they do not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowerdiff.build import build_module, resolve_precision
from flowerdiff.checkpoint import load_checkpoint
from flowerdiff.train import enable_tf32, train


@pytest.mark.slow
def test_bf16_mixed_channels_last_trains_on_cpu_without_nan(tiny_config, tmp_path: Path) -> None:
    metrics = train(tiny_config("trainer.precision=bf16-mixed", "model.channels_last=true"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    weights = checkpoint["current_model_state"]
    assert all(w.isfinite().all() for w in weights.values() if w.is_floating_point())
    # The master weights stay float32 under mixed precision.
    assert weights["net.time_mlp.0.weight"].dtype == torch.float32


def test_precision_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "auto") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "auto") == "16-mixed"


def test_compile_keeps_state_dict_keys_and_fused_adamw_only_on_cuda(tiny_config) -> None:
    plain = build_module(tiny_config())
    compiled = build_module(tiny_config("model.compile=true"))
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert not any("_orig_mod" in key for key in compiled.state_dict())

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
