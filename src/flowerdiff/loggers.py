"""Experiment-tracker glue: W&B online/offline choice, sweep grouping, run metadata, images.

W&B must never hang or fail a run for lack of network or login: :func:`setup_wandb` picks the
mode before the logger starts (``WANDB_MODE`` set by the user always wins), and
:func:`finish_wandb` closes the run after ``fit`` (so the next job of a multirun starts its own
run) and prints the ``wandb sync`` command for offline runs. :func:`log_image` sends a figure to
whichever loggers can show images and always keeps the PNG in the run directory.
"""

from __future__ import annotations

import configparser
import logging
import netrc
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerStatus
from omegaconf import DictConfig, open_dict
from torch import Tensor
from torchvision.io import read_image

from flowerdiff.images import save_png

log = logging.getLogger(__name__)

DEFAULT_WANDB_URL = "https://api.wandb.ai"
REACHABILITY_TIMEOUT_S = 3.0


# -- W&B mode ------------------------------------------------------------------------------
def wandb_base_url(environ: Mapping[str, str] = os.environ) -> str:
    """The W&B server: ``WANDB_BASE_URL``, else the one ``wandb login --host`` saved, else SaaS."""
    return environ.get("WANDB_BASE_URL") or _wandb_settings(environ).get(
        "base_url", DEFAULT_WANDB_URL
    )


def _wandb_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``[default]`` section of wandb's global settings file (written by ``wandb login``)."""
    folder = Path(environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(folder.expanduser() / "settings")
    except configparser.Error:
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def wandb_logged_in(environ: Mapping[str, str] = os.environ) -> bool:
    """Credentials exist locally (env var, identity token, netrc or settings file); no network.

    Mirrors where wandb itself looks, so "logged in" here means ``wandb.init`` would not prompt.
    """
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if _wandb_settings(environ).get("api_key"):
        return True
    netrc_path = Path(environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    host = urlsplit(wandb_base_url(environ)).hostname
    try:
        return bool(host and netrc.netrc(netrc_path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_reachable(environ: Mapping[str, str] = os.environ) -> bool:
    """A TCP connection to the W&B server opens within a few seconds (no request is sent)."""
    parts = urlsplit(wandb_base_url(environ))
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((parts.hostname, port), timeout=REACHABILITY_TIMEOUT_S):
            return True
    except OSError:
        return False


def choose_wandb_mode(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set ``WANDB_MODE`` to ``offline`` unless the user is logged in and the server answers.

    A ``WANDB_MODE`` already in the environment is the user's choice and is kept. Returns the
    mode W&B will run in.
    """
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if not wandb_logged_in(environ):
        reason = "not logged in (no WANDB_API_KEY, no `wandb login`)"
    elif not wandb_reachable(environ):
        reason = f"{wandb_base_url(environ)} is unreachable"
    else:
        return "online"
    environ["WANDB_MODE"] = "offline"
    log.info("W&B logs offline: %s; `wandb sync` uploads the run later.", reason)
    return "offline"


# -- run naming and metadata ---------------------------------------------------------------
def sweep_group_and_name() -> tuple[str | None, str | None]:
    """In a multirun: (the sweep directory's name, this job's overrides); else (None, None).

    All jobs of one sweep then share a W&B group, and each run reads like ``optimizer.lr=1e-4``.
    """
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, None
    name = hydra_cfg.job.get("override_dirname") or f"job{hydra_cfg.job.get('num', 0)}"
    return Path(hydra_cfg.sweep.dir).name, name


def setup_wandb(cfg: DictConfig) -> str | None:
    """Call before the loggers are instantiated: choose the W&B mode and, in a multirun, fill in
    the run's ``group`` and ``name`` when the config leaves them null. Returns the mode, or None
    when no W&B logger is configured."""
    entries = [
        entry
        for entry in (cfg.get("logger") or {}).values()
        if entry is not None and str(entry.get("_target_", "")).endswith("WandbLogger")
    ]
    if not entries:
        return None
    mode = choose_wandb_mode()
    group, name = sweep_group_and_name()
    with open_dict(cfg):
        for entry in entries:
            if entry.get("group") is None:
                entry.group = group
            if entry.get("name") is None:
                entry.name = name
    return mode


def run_metadata() -> dict[str, Any]:
    """The command line and the git commit (``-dirty`` when the tree has local changes), so a
    dashboard run says exactly what produced it."""
    root = Path(os.environ.get("FLOWERDIFF_ROOT") or Path(__file__).resolve().parents[2])
    return {
        "run/command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "run/git_commit": _git_commit(root),
    }


def _git_commit(root: Path) -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


# -- end of run ----------------------------------------------------------------------------
def finish_wandb(trainer: L.Trainer) -> Path | None:
    """Finish this process's W&B run (marked failed unless fit finished) and, when it ran
    offline, print where it is and how to upload it. Returns the offline run directory."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb else None
    if run is None or not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        return None
    offline_dir = Path(run.settings.sync_dir) if run.offline else None
    run.finish(exit_code=0 if trainer.state.status == TrainerStatus.FINISHED else 1)
    if offline_dir is not None:
        log.info(
            f"W&B run saved offline in {offline_dir}\nUpload it with:\n  wandb sync {offline_dir}"
        )
    return offline_dir


# -- images --------------------------------------------------------------------------------
def image_path(trainer: L.Trainer, key: str, step: int) -> Path:
    """``<run dir>/images/<key>/step_<step>.png``: one folder per figure, sorted by step."""
    return Path(trainer.default_root_dir) / "images" / key / f"step_{step:07d}.png"


def log_image(
    trainer: L.Trainer,
    key: str,
    image: Tensor | str | Path,
    step: int | None = None,
    caption: str | None = None,
) -> Path:
    """Save ``image`` ([C, H, W] in [0, 1], or a PNG path) into the run directory and show it in
    W&B and TensorBoard when those loggers are on; CSV and no logger keep just the file.

    Call on global rank zero only (the callbacks do): it touches no collective.
    """
    step = trainer.global_step if step is None else step
    path = image_path(trainer, key, step)
    if isinstance(image, Tensor):
        save_png(image, path)
    elif Path(image).resolve() != path.resolve():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key, [str(path)], step=step, **extra)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, read_image(str(path)), global_step=step)
    return path
