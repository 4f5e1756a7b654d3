"""Sweeps: Hydra multirun and the Optuna sweeper run for real (subprocesses of scripts/train.py),
failed jobs are recorded without stopping the sweep, and the summary ranks the jobs."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from flowerdiff.tasks.sweep import METRICS_FILE, SUMMARY_FILE, optimized_metric, run_task, summarize

from conftest import REPO_ROOT, TINY_OVERRIDES, compose_config, write_images

PYTHON = sys.executable


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [PYTHON, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def sweep(
    tmp_path: Path, sweep_dir: Path, *overrides: str, multirun: bool = True
) -> subprocess.CompletedProcess[str]:
    """`scripts/train.py [-m]` on the tiny config, every job of the sweep under ``sweep_dir``."""
    images = tmp_path / "images"
    if not images.is_dir():
        write_images(images, count=16)
    return run_script(
        "scripts/train.py",
        *(["--multirun"] if multirun else []),  # hparams_search sets hydra.mode itself
        *TINY_OVERRIDES,
        "+trainer.limit_train_batches=2",
        "++callbacks.denoising_grid=null",  # its end-of-training sample grid is half a job's time
        f"data.root={images}",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    )


def job_records(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{METRICS_FILE}")}


@pytest.mark.slow
def test_grid_multirun_runs_every_combination_and_summarizes(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "grid"
    sweep(tmp_path, sweep_dir, "optimizer.lr=1e-4,3e-4", "diffusion/schedule=cosine_clipped,linear")

    records = job_records(sweep_dir)
    assert sorted(records) == ["0", "1", "2", "3"]
    combos = set()
    for name, record in records.items():
        assert record["status"] == "completed", record.get("error")
        assert record["optimized_metric"] == "val/loss"  # the FID callback is off
        assert math.isfinite(record["value"]) and record["value"] == record["metrics"]["val/loss"]
        overrides = dict(o.split("=", 1) for o in record["overrides"])
        combos.add((overrides["optimizer.lr"], overrides["diffusion/schedule"]))
        assert (sweep_dir / name / "checkpoints" / "last.ckpt").is_file()  # its own checkpoints
        assert (sweep_dir / name / "csv" / "metrics.csv").is_file()  # and its own logs
    assert len(combos) == 4

    # The multirun ended with a summary; the script writes the same one, best first.
    assert (sweep_dir / SUMMARY_FILE).is_file()
    (sweep_dir / SUMMARY_FILE).unlink()
    proc = run_script("scripts/summarize_sweep.py", str(sweep_dir))
    assert "4 jobs" in proc.stdout and "optimizer.lr" in proc.stdout
    with (sweep_dir / SUMMARY_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    values = [float(row["val/loss"]) for row in rows]
    assert values == sorted(values) and len(values) == 4
    assert rows[0]["job"] == min(records, key=lambda n: records[n]["value"])
    assert {row["diffusion/schedule"] for row in rows} == {"cosine_clipped", "linear"}


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "failing"
    sweep(tmp_path, sweep_dir, "optimizer.lr=-1,1e-4")  # config validation rejects lr=-1

    records = job_records(sweep_dir)
    assert records["0"]["status"] == "failed"
    assert records["0"]["error"]["type"] == "ConfigError"
    assert "`optimizer.lr=-1` must be > 0" in records["0"]["error"]["message"]
    assert "validate_train_config" in records["0"]["error"]["traceback"]
    assert records["0"]["value"] is None
    assert records["1"]["status"] == "completed" and math.isfinite(records["1"]["value"])
    summary = summarize(sweep_dir)
    assert [row["status"] for row in summary.rows] == ["completed", "failed"]  # failures last


@pytest.mark.slow
def test_optuna_sweep_stores_trials_and_resumes(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    sweep_dir = tmp_path / "optuna"
    search = ("hparams_search=flowers_optuna", "hydra.sweeper.n_trials=3")
    sweep(tmp_path, sweep_dir, *search, multirun=False)

    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    study = optuna.load_study(study_name="flowers", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # callbacks.ema.decay is searched too, but TINY_OVERRIDES fixes it: a value given on the
    # command line takes that key out of the search space.
    assert set(study.trials[0].params) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "diffusion.loss.kind",
        "diffusion.prediction",
        "diffusion/schedule",
    }
    records = job_records(sweep_dir)
    for trial in study.trials:  # job dir N is trial N, and both saw the same value
        record = records[str(trial.number)]
        assert record["value"] == pytest.approx(trial.value)
        # The sampled diffusion settings reached the model the job trained.
        stored = torch.load(
            sweep_dir / str(trial.number) / "checkpoints" / "last.ckpt", weights_only=True
        )["flowerdiff"]["diffusion"]
        assert stored["schedule"]["name"] == trial.params["diffusion/schedule"]
        assert stored["prediction"] == trial.params["diffusion.prediction"]
        assert stored["loss"]["kind"] == trial.params["diffusion.loss.kind"]
    assert (sweep_dir / "optimization_results.yaml").is_file()

    # Same sweep dir again: the study continues. These two trials fail (lr=-1 is a config
    # error), which Optuna records as FAIL while the sweep still completes.
    sweep(
        tmp_path,
        sweep_dir,
        search[0],
        "hydra.sweeper.n_trials=2",
        "optimizer.lr=-1",
        multirun=False,
    )
    study = optuna.load_study(study_name="flowers", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["FAIL"] * 2
    records = job_records(sweep_dir)
    assert sorted(records) == ["0", "1", "2", "3", "4"]  # earlier job dirs kept
    assert [records[n]["status"] for n in ("3", "4")] == ["failed", "failed"]
    # The reseeded sampler does not replay the first trials' parameters.
    first = [t.params["optimizer.weight_decay"] for t in study.trials[:2]]
    assert all(t.params["optimizer.weight_decay"] not in first for t in study.trials[3:])


def multirun_config(tmp_path: Path, *overrides: str):
    cfg = compose_config(
        [*TINY_OVERRIDES, f"paths.root_dir={tmp_path}", *overrides], output_dir=tmp_path / "job"
    )
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 7
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_optimized_metric_defaults_to_fid_when_the_fid_callback_is_on() -> None:
    fid_on = OmegaConf.create({"optimized_metric": None, "callbacks": {"fid": {"_target_": "F"}}})
    assert optimized_metric(fid_on) == "val/fid"
    assert optimized_metric(compose_config(["~callbacks.fid"])) == "val/loss"
    assert optimized_metric(compose_config(["optimized_metric=train/loss"])) == "train/loss"


def test_run_task_returns_the_metric_and_records_the_job(tmp_path: Path) -> None:
    cfg = multirun_config(tmp_path, "optimized_metric=val/loss")
    assert run_task(lambda cfg: {"val/loss": 0.25, "train/loss": 0.5}, cfg) == 0.25
    record = json.loads((tmp_path / "job" / METRICS_FILE).read_text())
    assert record["status"] == "completed" and record["job"] == 7
    assert record["metrics"] == {"val/loss": 0.25, "train/loss": 0.5}
    assert "optimized_metric=val/loss" in record["overrides"]


@pytest.mark.parametrize(
    ("metrics", "message"),
    [({"val/loss": math.nan}, "val/loss is nan"), ({"train/loss": 0.1}, "was not logged")],
    ids=["nan", "missing"],
)
def test_unusable_metric_fails_a_multirun_job_only(
    tmp_path: Path, metrics: dict, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = multirun_config(tmp_path, "optimized_metric=val/loss")
    assert run_task(lambda cfg: metrics, cfg) is None
    record = json.loads((tmp_path / "job" / METRICS_FILE).read_text())
    assert record["status"] == "failed" and message in record["error"]["message"]

    # A single run that trained to the end keeps its result: a diverged metric is a warning, a
    # metric the run never logged (shorter than the FID interval) only information.
    caplog.clear()
    caplog.set_level(logging.INFO)
    cfg = compose_config(["optimized_metric=val/loss"], output_dir=tmp_path / "run")
    run_task(lambda cfg: metrics, cfg)
    (said,) = [r for r in caplog.records if message in r.getMessage()]
    assert said.levelno == (logging.INFO if "logged" in message else logging.WARNING)
    assert json.loads((tmp_path / "run" / METRICS_FILE).read_text())["status"] == "completed"


def test_single_run_errors_still_raise(tmp_path: Path) -> None:
    cfg = compose_config([f"paths.root_dir={tmp_path}"], output_dir=tmp_path / "run")

    def explode(cfg):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_task(explode, cfg)
    record = json.loads((tmp_path / "run" / METRICS_FILE).read_text())
    assert record["status"] == "failed" and "out of memory" in record["error"]["message"]


def test_summary_ranks_by_the_sweeper_direction(tmp_path: Path) -> None:
    jobs = [("0", 2.0), ("1", 5.0), ("10", None), ("2", None)]
    for job, value in jobs:
        (tmp_path / job).mkdir()
        record = {
            "job": int(job),
            "overrides": [f"optimizer.lr={job}"],
            "optimized_metric": "val/score",
            "direction": "maximize",
            "status": "failed" if value is None else "completed",
            "value": value,
            "metrics": {} if value is None else {"val/score": value},
            "error": {"type": "RuntimeError", "message": "boom"} if value is None else None,
        }
        (tmp_path / job / METRICS_FILE).write_text(json.dumps(record))
    summary = summarize(tmp_path)
    # Best first (this sweep maximized), then failed jobs by job number (2 before 10).
    assert [row["job"] for row in summary.rows] == ["1", "0", "2", "10"]
    assert summary.rows[2]["error"] == "RuntimeError: boom"
    assert summary.columns[:4] == ["job", "status", "val/score", "optimizer.lr"]


def test_optuna_search_config_composes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_config(["hparams_search=flowers_optuna", f"hydra.sweep.dir={tmp_path}/s"])
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "minimize" and sweeper.sampler.seed is not None
    assert sweeper.storage == f"sqlite:///{tmp_path}/s/optuna.db"
    assert sweeper.params["optimizer.lr"] == "tag(log, interval(1e-5, 1e-3))"
    for key in (
        "callbacks.ema.decay",
        "diffusion.loss.kind",
        "diffusion.prediction",
        "diffusion/schedule",
    ):
        assert str(sweeper.params[key]).startswith("choice(")
    assert cfg.hydra.mode.name == "MULTIRUN"
