"""Devices and precision: what the trainer and the scripts run on, checked before any work.

One mapping from a precision name to autocast (:func:`autocast_context`) serves training-time
sampling, the scripts and the benchmarks; :func:`resolve_device` turns ``device=...`` into a
device or a one-paragraph error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

GPU_ACCELERATORS = ("gpu", "cuda")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
AUTO_PRECISIONS = ("auto", "auto-bf16")
# The Lightning precisions every part of flowerdiff runs (training, grids, FID, sampling scripts):
# the canonical names, and YAML's 32. The aliases "bf16" and "16" would make the race's
# like-for-like check miss them; 16-true, bf16-true and 64-true stop a run with a dtype error.
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "32")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def native_cpu_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX-512 or AMX). Without
    it they fall back to a generic kernel: measured on a 2-core AVX2 EPYC, a bf16-autocast
    training step of ``unet_cpu`` took 15x as long as a float32 one."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str | int:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on older GPUs, 32-true on the CPU.
    ``auto-bf16``: the same, except bf16-mixed on a CPU that computes bf16 natively (the CPU
    recipes': 1.3x the images/s of float32 there, a fraction of it elsewhere)."""
    if str(precision) not in AUTO_PRECISIONS:
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision == "auto-bf16" and accelerator in ("auto", "cpu") and native_cpu_bf16():
        return "bf16-mixed"
    return "32-true"


def check_precision(precision: Any, key: str = "trainer.precision") -> None:
    """A ValueError naming ``key`` for a precision flowerdiff does not run, so that a typo is
    refused with the other config errors rather than by the Trainer after the data load."""
    if str(precision) not in AUTO_PRECISIONS + SUPPORTED_PRECISIONS:
        raise ValueError(
            f"`{key}={precision!r}` is not a precision flowerdiff runs. Use auto (float32 on the "
            "CPU, bf16 or 16-bit mixed on GPUs), auto-bf16 (also bf16 on a CPU that computes it "
            "natively), 32-true, bf16-mixed or 16-mixed."
        )


def autocast_context(
    precision: str | int, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast Lightning's ``*-mixed`` precision would use for the forward
    pass on ``device`` (``auto`` resolved as in training; 32-bit: no autocast)."""
    check_precision(precision, "precision")
    accelerator = "gpu" if device.type == "cuda" else device.type
    dtype = AUTOCAST_DTYPES.get(str(resolve_precision(precision, accelerator)))
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def resolve_device(name: Any, key: str = "device") -> torch.device:
    """``auto`` (CUDA when there is a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a
    GPU that is not there is a ValueError naming ``key``, not a failure deep in loading."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"`{key}={name!r}` is not a device. Valid values: auto, cpu, cuda, cuda:N."
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(
                f"`{key}={name!r}` asks for a CUDA GPU, but none is visible on this machine "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Use "
                f"{key}=cpu or {key}=auto."
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"`{key}={name!r}`: this machine shows {count} GPU(s), cuda:0 to cuda:{count - 1}."
            )
    return device


def _requested_devices(devices: Any, available: int | None) -> int | list[int] | None:
    """The device count (or GPU id list) ``trainer.devices`` asks for; None if unparseable.

    ``available`` is the GPU count when the run will use CUDA, None on CPU (where "auto" is 1).
    """
    if isinstance(devices, list | tuple):
        return [int(d) for d in devices] if all(_is_int(d) for d in devices) else None
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return available if available is not None else 1
        if "," in text:  # Lightning's "0,1" form: a list of GPU ids
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None
        devices = int(text) if text.lstrip("-").isdigit() else None
    if not _is_int(devices):
        return None
    if devices == -1:
        return available if available is not None else os.cpu_count() or 1
    return devices if devices >= 1 else None


def check_devices(cfg: Any) -> Iterator[str]:
    """More devices than exist, and ``data.batch_size`` not divisible by the process count.

    GPUs are counted with ``torch.cuda.device_count()`` when ``trainer.accelerator`` is
    gpu/cuda, or auto on a machine with CUDA. On the CPU, ``trainer.devices=N`` is allowed
    whatever the core count: Lightning then runs N DDP processes, which is how multi-process
    code is tested without GPUs.
    """
    accelerator = str(_get(cfg, "trainer.accelerator") or "auto").lower()
    devices_value = _get(cfg, "trainer.devices")
    if devices_value is None:
        return
    uses_gpu = accelerator in GPU_ACCELERATORS or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    available = torch.cuda.device_count() if uses_gpu else None
    requested = _requested_devices(devices_value, available)
    if requested is None:
        yield (
            f"`trainer.devices={devices_value!r}` is not understood. Valid values are a "
            "positive number of devices (e.g. 1 or 4), -1 or 'auto' for all of them, or a list "
            "of GPU ids (e.g. [0, 1])."
        )
        return
    if uses_gpu and available == 0:
        yield (
            f"`trainer.accelerator={accelerator!r}` needs a CUDA GPU, but none is visible "
            f"(torch.cuda.device_count() = 0, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Use trainer.accelerator=cpu "
            "(or auto), or run on a machine with a GPU."
        )
        return
    if uses_gpu and available is not None:
        if isinstance(requested, list):
            missing = [d for d in requested if not 0 <= d < available]
            if missing:
                yield (
                    f"`trainer.devices={requested}` names GPU id(s) {missing} that do not exist: "
                    f"this machine shows {available} GPU(s), ids 0 to {available - 1}. Valid "
                    f"values are ids among {list(range(available))}, a count from 1 to "
                    f"{available}, or -1 / 'auto' for all."
                )
                return
        elif requested > available:
            yield (
                f"`trainer.devices={requested}` asks for more GPUs than this machine has "
                f"({available} visible). Valid values are 1 to {available}, -1 / 'auto' for all, "
                "or a list of GPU ids; use trainer.num_nodes for more machines."
            )
            return
    if accelerator == "mps" and (len(requested) if isinstance(requested, list) else requested) > 1:
        yield (
            f"`trainer.devices={devices_value!r}` with trainer.accelerator=mps: Apple GPUs run "
            "one process only. Valid value: 1."
        )
        return
    yield from _check_batch_split(cfg, requested)


def _check_batch_split(cfg: Any, requested: int | list[int]) -> Iterator[str]:
    batch_size = _get(cfg, "data.batch_size")
    num_nodes = _get(cfg, "trainer.num_nodes") or 1
    if batch_size is None:
        return
    if not _is_int(batch_size) or batch_size < 1:
        yield f"`data.batch_size={batch_size!r}` must be a positive integer (the global batch)."
        return
    if not _is_int(num_nodes) or num_nodes < 1:
        yield f"`trainer.num_nodes={num_nodes!r}` must be a positive integer (machines)."
        return
    per_node = len(requested) if isinstance(requested, list) else requested
    world = per_node * num_nodes
    if batch_size % world:
        lower = (batch_size // world) * world
        nearest = [s for s in (lower, lower + world) if s > 0]
        yield (
            f"`data.batch_size={batch_size}` cannot be split evenly over {world} processes "
            f"(trainer.devices={per_node} x trainer.num_nodes={num_nodes}): data.batch_size is "
            f"the global batch per forward pass, shared by all processes. Valid values are the "
            f"multiples of {world}; the nearest are {' or '.join(map(str, nearest))}."
        )


def _get(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
