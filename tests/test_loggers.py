"""W&B mode choice, sweep naming, image logging, and a real offline W&B run read back from disk."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf, open_dict
from PIL import Image

from flowerdiff.infra import loggers
from flowerdiff.infra.loggers import choose_wandb_mode, setup_wandb, sweep_group_and_name
from flowerdiff.tasks.train import train
from flowerdiff.viz.dashboard import log_image

from conftest import compose_config


@pytest.fixture
def no_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment with no W&B credentials anywhere (and no WANDB_MODE), home untouched."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.setenv(name, "x")  # recorded, so the test's changes are undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    return {"NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}


def test_offline_without_login_and_user_mode_wins(no_login: dict[str, str]) -> None:
    environ = dict(no_login)
    assert choose_wandb_mode(environ) == "offline"
    assert environ["WANDB_MODE"] == "offline"
    assert choose_wandb_mode({**no_login, "WANDB_MODE": "disabled"}) == "disabled"


def test_logged_in_goes_online_only_when_reachable(
    no_login: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    environ = {**no_login, "NETRC": str(netrc)}
    assert loggers.wandb_logged_in(environ)
    assert loggers.wandb_logged_in({**no_login, "WANDB_API_KEY": "k" * 40})
    monkeypatch.setattr(loggers, "wandb_reachable", lambda environ: True)
    assert choose_wandb_mode(dict(environ)) == "online"
    monkeypatch.setattr(loggers, "wandb_reachable", lambda environ: False)
    assert choose_wandb_mode(dict(environ)) == "offline"


def test_multirun_jobs_share_a_group_and_are_named_by_overrides(
    tiny_config, no_login: dict[str, str]
) -> None:
    cfg = tiny_config("logger=many")
    assert sweep_group_and_name() == (None, None)  # a single run keeps W&B's defaults
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = "outputs/train/multiruns/2026-11-22_10-00-00"
        cfg.hydra.job.override_dirname = "optimizer.lr=0.001,seed=1"
    HydraConfig.instance().set_config(cfg)
    assert setup_wandb(cfg) == "offline"
    assert cfg.logger.wandb.group == "2026-11-22_10-00-00"
    assert cfg.logger.wandb.name == "optimizer.lr=0.001,seed=1"
    assert setup_wandb(compose_config(["logger=csv"])) is None  # no W&B logger: untouched


@pytest.mark.parametrize("logger", ["tensorboard", "csv", None])
def test_log_image_always_writes_the_png(tmp_path: Path, logger: str | None) -> None:
    chosen = {
        "tensorboard": TensorBoardLogger(tmp_path, name="tb", version=""),
        "csv": CSVLogger(tmp_path, name="csv", version=""),
        None: False,
    }[logger]
    trainer = L.Trainer(default_root_dir=tmp_path, logger=chosen, accelerator="cpu")
    image = torch.rand(3, 10, 14)
    path = log_image(trainer, "samples/grid", image, step=7)
    assert path == tmp_path / "images" / "samples" / "grid" / "step_0000007.png"
    assert Image.open(path).size == (14, 10)
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        trainer.loggers[0].experiment.flush()
        events = EventAccumulator(str(tmp_path / "tb")).Reload()
        assert "samples/grid" in events.Tags()["images"]


# -- a real offline W&B run ----------------------------------------------------------------------
def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of a ``.wandb`` file (LevelDB-style log: 32 KiB blocks of chunks
    with a 7-byte header; W&B ships no Python reader any more)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(run_dir: Path) -> tuple[dict, dict[str, object]]:
    """(config, every history key with its last value) of an offline run directory."""
    config: dict = {}
    keys: dict[str, object] = {}
    for record in wandb_records(next(run_dir.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update
        if kind in ("run", "config"):
            config.update({u.key: json.loads(u.value_json) for u in updates})
        elif kind == "history":
            for item in record.history.item:
                keys["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return config, keys


@pytest.mark.slow
def test_offline_wandb_run_holds_metrics_config_and_images(
    tiny_config, no_login: dict[str, str], tmp_path: Path
) -> None:
    import wandb

    cfg = tiny_config("logger=wandb")
    metrics = train(cfg)
    assert "val/loss" in metrics
    assert wandb.run is None  # finished, so a next multirun job starts its own run
    wandb.teardown()  # wait for wandb-core to close the file (process exit does the same)

    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    config, keys = read_offline_run(run_dir)
    assert config["model"]["net"]["hidden_dims"] == [16, 32, 32, 64]  # nested: filterable
    assert config["data"]["image_size"] == 16
    assert config["model/params_total"] > 0
    assert config["run/command"] and "run/git_commit" in config
    for key in ("train/loss_step", "val/loss", "train/grad_norm", "lr-AdamW"):
        assert key in keys, key
    assert "train/images_per_sec" in keys
    media = run_dir / "files" / "media" / "images" / "samples"
    sizes = {p.name.split("_")[0]: Image.open(p).size for p in media.glob("*.png")}
    # TINY_OVERRIDES: 4 samples of 16 px in a 2x2 grid with 2 px padding; trajectory: 5
    # columns, 2 samples with an x0 row each; forward diffusion: 6 timesteps of 2 images.
    assert sizes == {"grid": (38, 38), "trajectory": (92, 74), "forward": (110, 38)}
    # Captions travel with the figures: the forward grid's timesteps, the trajectory's steps.
    assert keys["samples/forward_diffusion/captions"] == ["t=0, t=200, t=400, t=600, t=800, t=999"]
    (trajectory,) = keys["samples/trajectory/captions"]
    assert trajectory.startswith("t=750, t=500") and trajectory.endswith(
        "t=0 (x / predicted x0 rows)"
    )
