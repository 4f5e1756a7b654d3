"""Turn a composed Hydra config into objects: module, callbacks, loggers, trainer precision.

Shared by training, sampling, evaluation and checkpoint loading, so that a checkpoint's stored
config rebuilds exactly the module that wrote it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from flowerdiff.module import DiffusionModule

log = logging.getLogger(__name__)

# The config groups a checkpoint needs to rebuild its module (stored inside the checkpoint).
MODULE_CONFIG_KEYS = ("model", "scheduler", "sampler", "optimizer", "lr_scheduler", "data")


def module_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved, plain-Python part of ``cfg`` that :func:`build_module` reads."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        for key in MODULE_CONFIG_KEYS
        if cfg.get(key) is not None
    }


def build_module(cfg: DictConfig | dict[str, Any]) -> DiffusionModule:
    """Instantiate net, schedule, loss, sampler and optimizer factories into a DiffusionModule."""
    config = module_config(cfg)
    model = config["model"]
    data = config.get("data", {})
    return DiffusionModule(
        net=instantiate(model["net"]),
        schedule=instantiate(config["scheduler"]),
        loss=instantiate(model["loss"]),
        sampler=instantiate(config["sampler"]),
        optimizer=instantiate(config["optimizer"]) if "optimizer" in config else None,
        lr_scheduler=instantiate(config["lr_scheduler"]) if "lr_scheduler" in config else None,
        prediction=model.get("prediction", "epsilon"),
        image_size=data.get("image_size", model["net"].get("image_size", 64)),
        in_channels=model["net"].get("in_channels", 3),
        compile=model.get("compile", False),
        channels_last=model.get("channels_last", False),
        config=config,
    )


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Every ``_target_`` entry of the ``callbacks`` group; ``null`` entries switch one off."""
    if not callbacks_cfg:
        return []
    return [instantiate(c) for c in callbacks_cfg.values() if c is not None and "_target_" in c]


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Every ``_target_`` entry of the ``logger`` group (several at once with ``logger=many``)."""
    if not logger_cfg:
        return []
    return [instantiate(c) for c in logger_cfg.values() if c is not None and "_target_" in c]


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str | int:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on older GPUs, 32-true on the CPU."""
    if str(precision) != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"
