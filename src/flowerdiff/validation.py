"""Check the composed config before anything heavy is built or downloaded.

Every problem found becomes one paragraph naming the config key, the value given, the valid
values and the fix; all of them are reported together in one :class:`ConfigError`, so a run
that would die at step 0 (or after an hour of decoding images) fails in a second instead. The
checks read plain config values only: no model is built, no file is opened except to test
that ``ckpt_path`` exists, and nothing touches the network.

Works on partial configs too (``sample.yaml``, ``evaluate.yaml``): a group that is absent is
not checked.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from flowerdiff.diffusion import PREDICTION_TYPES, SCHEDULE_NAMES, NoiseSchedule, Sampler
from flowerdiff.diffusion.losses import LOSS_KINDS, LOSS_WEIGHTINGS
from flowerdiff.diffusion.samplers import TIMESTEP_SPACINGS
from flowerdiff.models import UNet

# Values Lightning resolves itself for `trainer.fit(ckpt_path=...)`.
SPECIAL_CKPT_PATHS = ("last", "hpc", "registry")
GPU_ACCELERATORS = ("gpu", "cuda")


class ConfigError(ValueError):
    """The composed config cannot train; the message lists every problem and its fix."""


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem in ``cfg``; return quietly if none."""
    problems = [
        *check_model(cfg),
        *check_schedule(cfg),
        *check_sampler(cfg),
        *check_devices(cfg),
        *check_ckpt_path(cfg),
    ]
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ConfigError(
            f"The config has {count}; nothing was started.\n\n" + "\n\n".join(problems)
        )


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _options(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target_class(cfg: DictConfig, key: str) -> type | None:
    target = _get(cfg, f"{key}._target_")
    if target is None:
        return None
    try:
        return get_class(target)
    except Exception:  # Hydra raises ImportError, AttributeError or ValueError by case
        return None


def _unknown_keys(cfg: DictConfig, key: str, cls: type) -> Iterator[str]:
    """Keys of ``cfg[key]`` that ``cls.__init__`` does not accept (typos, or a key left over
    from another option of the group, e.g. ``sampler.eta`` after switching to DPM-Solver)."""
    node = _get(cfg, key)
    parameters = inspect.signature(cls).parameters
    if not isinstance(node, dict) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        return
    valid = [name for name in parameters if name != "self"]
    for name in node:
        if not name.startswith("_") and name not in valid:
            yield (
                f"`{key}.{name}` is not a parameter of {cls.__name__}. Valid keys under `{key}` "
                f"are: {', '.join(valid)}. Remove it (e.g. `~{key}.{name}` on the command line) "
                "or fix the spelling."
            )


def check_model(cfg: DictConfig) -> Iterator[str]:
    """Prediction type, loss kind/weighting, and ``data.image_size`` against the U-Net depth."""
    if _get(cfg, "model") is None:
        return
    prediction = _get(cfg, "model.prediction")
    if prediction is not None and prediction not in PREDICTION_TYPES:
        yield (
            f"`model.prediction={prediction!r}` is not a known prediction type. Valid values are "
            f"{_options(PREDICTION_TYPES)}: what the network predicts (the noise, as the book; "
            "the velocity v; or the clean image)."
        )
    kind = _get(cfg, "model.loss.kind")
    if kind is not None and kind not in LOSS_KINDS:
        yield (
            f"`model.loss.kind={kind!r}` is not a known loss. Valid values are "
            f"{_options(LOSS_KINDS)} ('l1' is the book's)."
        )
    weighting = _get(cfg, "model.loss.weighting")
    if weighting is not None and weighting not in LOSS_WEIGHTINGS:
        yield (
            f"`model.loss.weighting={weighting!r}` is not a known loss weighting. Valid values "
            f"are {_options(LOSS_WEIGHTINGS)} ('min_snr' is Hang et al. 2023, with "
            "model.loss.snr_gamma)."
        )
    net_class = _target_class(cfg, "model.net")
    if net_class is None or not issubclass(net_class, UNet):
        return
    yield from _unknown_keys(cfg, "model.net", net_class)
    image_size = _get(cfg, "data.image_size")
    if image_size is None:
        image_size = _get(cfg, "model.net.image_size")
    hidden_dims = _get(cfg, "model.net.hidden_dims") or [128, 256, 512, 1024]
    factor = 2 ** max(len(hidden_dims) - 2, 0)
    if not _is_int(image_size) or image_size <= 0 or image_size % factor:
        below = (image_size // factor) * factor if _is_int(image_size) else 0
        nearest = [s for s in (below, below + factor) if s > 0]
        yield (
            f"`data.image_size={image_size!r}` does not fit the U-Net: model.net.hidden_dims="
            f"{hidden_dims} has {len(hidden_dims)} levels, so the network halves the resolution "
            f"{len(hidden_dims) - 2} times and every level must keep whole pixels. Valid values "
            f"are the positive multiples of {factor} ({factor}, {2 * factor}, {3 * factor}, ...); "
            f"the nearest are {' or '.join(map(str, nearest))}."
        )


def check_schedule(cfg: DictConfig) -> Iterator[str]:
    """``scheduler.name`` and ``scheduler.num_timesteps``."""
    if _get(cfg, "scheduler") is None:
        return
    schedule_class = _target_class(cfg, "scheduler")
    if schedule_class is None or not issubclass(schedule_class, NoiseSchedule):
        yield (
            f"`scheduler._target_={_get(cfg, 'scheduler._target_')!r}` is not a noise schedule. "
            "Use flowerdiff.diffusion.NoiseSchedule and pick the betas with `scheduler.name`; "
            "or choose a preset with `scheduler=cosine_clipped` / `scheduler=linear`."
        )
        return
    yield from _unknown_keys(cfg, "scheduler", schedule_class)
    name = _get(cfg, "scheduler.name")
    if name is not None and name not in SCHEDULE_NAMES:
        yield (
            f"`scheduler.name={name!r}` is not a known noise schedule. Valid values are "
            f"{_options(SCHEDULE_NAMES)} ('cosine_clipped' is the book's)."
        )
    steps = _get(cfg, "scheduler.num_timesteps")
    if steps is not None and (not _is_int(steps) or steps < 2):
        yield (
            f"`scheduler.num_timesteps={steps!r}` is invalid: it is the number of training "
            "timesteps T, an integer >= 2 (1000 in the book)."
        )


def check_sampler(cfg: DictConfig) -> Iterator[str]:
    """Sampler class, ``num_inference_steps`` <= T, ``eta`` >= 0, timestep spacing."""
    if _get(cfg, "sampler") is None:
        return
    sampler_class = _target_class(cfg, "sampler")
    if sampler_class is None or not issubclass(sampler_class, Sampler):
        known = [f"flowerdiff.diffusion.{c.__name__}" for c in _sampler_classes()]
        yield (
            f"`sampler._target_={_get(cfg, 'sampler._target_')!r}` is not a known sampler. "
            f"Valid values are {', '.join(known)} (or your own subclass of "
            "flowerdiff.diffusion.Sampler); pick a preset with `sampler=<name>` (conf/sampler/)."
        )
        return
    yield from _unknown_keys(cfg, "sampler", sampler_class)
    steps = _get(cfg, "sampler.num_inference_steps")
    timesteps = _get(cfg, "scheduler.num_timesteps")
    if steps is not None and (not _is_int(steps) or steps < 1):
        yield (
            f"`sampler.num_inference_steps={steps!r}` is invalid: it is the number of denoising "
            "steps, an integer >= 1 (50 in the book)."
        )
    elif _is_int(steps) and _is_int(timesteps) and steps > timesteps:
        yield (
            f"`sampler.num_inference_steps={steps}` exceeds `scheduler.num_timesteps={timesteps}`:"
            " a sampler visits each training timestep at most once. Valid values are 1 to "
            f"{timesteps}."
        )
    eta = _get(cfg, "sampler.eta")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, int | float) or eta < 0):
        yield (
            f"`sampler.eta={eta!r}` is invalid: it must be a number >= 0 (0 = deterministic "
            "DDIM, 1 = DDPM-like stochastic sampling, the book's setting)."
        )
    spacing = _get(cfg, "sampler.timestep_spacing")
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        yield (
            f"`sampler.timestep_spacing={spacing!r}` is not known. Valid values are "
            f"{_options(TIMESTEP_SPACINGS)} (diffusers' semantics; the book uses 'leading')."
        )


def _sampler_classes() -> list[type]:
    import flowerdiff.diffusion as diffusion

    return [
        obj
        for obj in vars(diffusion).values()
        if isinstance(obj, type) and issubclass(obj, Sampler) and obj is not Sampler
    ]


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


def check_devices(cfg: DictConfig) -> Iterator[str]:
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


def _check_batch_split(cfg: DictConfig, requested: int | list[int]) -> Iterator[str]:
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


def check_ckpt_path(cfg: DictConfig) -> Iterator[str]:
    """A resume path that does not exist fails now, not after the data has been decoded."""
    ckpt_path = _get(cfg, "ckpt_path")
    if ckpt_path is None or str(ckpt_path) in SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
        return
    if not Path(ckpt_path).expanduser().is_file():
        yield (
            f"`ckpt_path={ckpt_path!r}` does not exist. To resume, pass the path of a .ckpt "
            "file written by training (e.g. outputs/train/runs/<date>/checkpoints/last.ckpt), "
            "`last` for this run directory's last.ckpt, or null to start from scratch."
        )


# -- configs read from files (checkpoints, exports) ---------------------------------------------
# A checkpoint's stored config is data from whoever wrote the file, and building the module
# instantiates its `_target_`s: weights_only=True alone would still let a crafted file call any
# importable function (torch.save over ~/.bashrc, say). Hydra 1.3.8 blocks the obvious ones
# (os.system...) but calls itself best effort, so loading only accepts the classes a flowerdiff
# module is made of.
TRUSTED_TARGET_PREFIXES = ("flowerdiff.", "torch.optim.")
TRUSTED_FACTORIES = frozenset({"flowerdiff.optim.warmup_cosine"})


def _trusted_bases() -> tuple[type, ...]:
    import lightning as L

    return (
        torch.nn.Module,
        Sampler,
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
        L.LightningDataModule,
    )


def untrusted_targets(config: Any, key: str = "") -> list[str]:
    """``key=target`` for every ``_target_`` in ``config`` that is not a flowerdiff model part.

    Trusted: classes under ``flowerdiff.`` / ``torch.optim.`` deriving from nn.Module, Sampler,
    Optimizer, LRScheduler or LightningDataModule, and the factories in ``TRUSTED_FACTORIES``.
    Only modules under those prefixes are ever imported to check.
    """
    found: list[str] = []
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and not _is_trusted_target(target):
            found.append(f"{key + '.' if key else ''}_target_={target!r}")
        for name, value in config.items():
            found += untrusted_targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(config, list | tuple):
        for index, value in enumerate(config):
            found += untrusted_targets(value, f"{key}[{index}]")
    return found


def _is_trusted_target(target: Any) -> bool:
    if not isinstance(target, str) or not target.startswith(TRUSTED_TARGET_PREFIXES):
        return False
    if target in TRUSTED_FACTORIES:
        return True
    cls = _target_class(OmegaConf.create({"node": {"_target_": target}}), "node")
    return cls is not None and isinstance(cls, type) and issubclass(cls, _trusted_bases())
