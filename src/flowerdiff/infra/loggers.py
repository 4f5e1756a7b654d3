"""Experiment-tracker glue: W&B online/offline choice, run identity, sweep grouping, metadata.

W&B must never hang or fail a run, whatever the network or the server does: :func:`setup_wandb`
picks the mode before the logger starts (``WANDB_MODE`` set by the user always wins) and gives
the run the id kept in its run directory; :func:`start_wandb` starts the run with a bounded
timeout and falls back to offline with a one-line warning when the server fails, answers
badly or not at all; :func:`finish_wandb` closes the run after ``fit`` (so the next job of a
multirun starts its own run) and prints the ``wandb sync`` command for offline runs.
"""

from __future__ import annotations

import configparser
import logging
import netrc
import os
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.trainer.states import TrainerStatus
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

DEFAULT_WANDB_URL = "https://api.wandb.ai"
REACHABILITY_TIMEOUT_S = 3.0
WANDB_INIT_TIMEOUT_S = 30  # wandb.init gives up after this (WANDB_INIT_TIMEOUT overrides it)
RUN_ID_FILE = "wandb-run-id"  # in the run directory: a resumed run continues the same W&B run


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


def wandb_entries(cfg: DictConfig) -> list[DictConfig]:
    return [
        entry
        for entry in (cfg.get("logger") or {}).values()
        if entry is not None and str(entry.get("_target_", "")).endswith("WandbLogger")
    ]


def setup_wandb(cfg: DictConfig) -> str | None:
    """Call before the loggers are instantiated: choose the W&B mode; give the run the id kept
    in its run directory (a resumed run continues the same W&B run, one curve not two); in a
    multirun, fill in ``group`` and ``name`` when the config leaves them null. Returns the mode,
    or None when no W&B logger is configured."""
    entries = wandb_entries(cfg)
    if not entries:
        return None
    mode = choose_wandb_mode()
    os.environ.setdefault("WANDB_INIT_TIMEOUT", str(WANDB_INIT_TIMEOUT_S))
    group, name = sweep_group_and_name()
    with open_dict(cfg):
        for entry in entries:
            if entry.get("group") is None:
                entry.group = group
            if entry.get("name") is None:
                entry.name = name
            if entry.get("id") is None:
                entry.id = run_id(Path(entry.get("save_dir") or "."))
                entry.resume = "allow"
    return mode


def run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created on first use."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored.isalnum():
            return stored
    new = uuid.uuid4().hex[:12]  # W&B run ids: unique within a project, alphanumeric
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


def start_wandb(cfg: DictConfig, loggers: list[Logger]) -> list[Logger]:
    """Start every W&B run now, so that a server that fails, answers 404 or never answers costs
    at most ``WANDB_INIT_TIMEOUT`` seconds and a warning: the run falls back to offline
    (same id, so ``wandb sync`` later uploads it as the same run) and trains."""
    started = []
    for logger in loggers:
        if isinstance(logger, WandbLogger) and not logger._offline:
            try:
                logger.experiment  # noqa: B018 - creating it is the point
            except Exception as error:  # wandb raises CommError, UsageError, timeouts...
                logger = offline_wandb_logger(cfg, error)
        started.append(logger)
    return started


def offline_wandb_logger(cfg: DictConfig, error: BaseException) -> Logger:
    import wandb
    from hydra.utils import instantiate

    wandb.teardown()  # forget the half-started online run (its id stays ours)
    os.environ["WANDB_MODE"] = "offline"
    entry = wandb_entries(cfg)[0]
    logger = instantiate(entry, offline=True)
    run = logger.experiment
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    log.warning(
        "W&B could not start online at %s (%s: %s); logging offline to %s instead. Upload it "
        "later with: wandb sync %s",
        wandb_base_url(),
        type(error).__name__,
        reason,
        run.settings.sync_dir,
        run.settings.sync_dir,
    )
    return logger


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
