"""``train(cfg)``: seed, instantiate everything from the composed config, fit, return metrics."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowerdiff.build import (
    build_module,
    instantiate_callbacks,
    instantiate_loggers,
    resolve_precision,
)
from flowerdiff.loggers import finish_wandb, run_metadata, setup_wandb
from flowerdiff.resume import resolve_ckpt_path
from flowerdiff.validation import validate_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as ``cfg`` says and return the final metrics (``trainer.callback_metrics``).

    Everything is built before ``fit`` starts, so a bad path or an impossible config fails in
    seconds, not after the first epoch.
    """
    validate_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    enable_tf32()

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    module = build_module(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    setup_wandb(cfg)  # online/offline and multirun group/name, before the logger starts
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(
        trainer_cfg.get("precision", "auto"), trainer_cfg.get("accelerator", "auto")
    )
    trainer: L.Trainer = instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, _convert_="partial"
    )

    log_run_config(trainer, module, cfg)
    try:
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), trainer)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:  # the next multirun job must start its own W&B run
        finish_wandb(trainer)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs: ~2x float32 speed at bf16-like accuracy.

    Only matters for 32-true runs and for the float32 parts of mixed precision; a no-op on the
    CPU and on older GPUs.
    """
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def log_run_config(trainer: L.Trainer, module: L.LightningModule, cfg: DictConfig) -> None:
    """Send the whole resolved config and the parameter count to every logger."""
    params: dict[str, Any] = {
        key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        for key, node in cfg.items()
        if key != "hydra"  # Hydra's own node (present under the compose API) is not the run's
    }
    params.update(run_metadata())
    params["model/params_total"] = sum(p.numel() for p in module.parameters())
    params["model/params_trainable"] = sum(
        p.numel() for p in module.parameters() if p.requires_grad
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
