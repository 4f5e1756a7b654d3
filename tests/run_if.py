"""``RunIf``: skip a test, with the reason, when the machine cannot run it (as in
lightning-hydra-template). GPU tests are skipped on CPU machines, never passed vacuously."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def RunIf(
    min_gpus: int = 0, bf16_cuda: bool = False, package: str | None = None
) -> pytest.MarkDecorator:
    reasons = []
    if torch.cuda.device_count() < min_gpus:
        reasons.append(
            f"needs {min_gpus} CUDA GPU(s), this machine has {torch.cuda.device_count()}"
        )
    if bf16_cuda and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        reasons.append("needs a CUDA GPU with bf16 (Ampere or newer)")
    if package and importlib.util.find_spec(package) is None:
        reasons.append(f"needs the {package!r} package")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "runs here")
