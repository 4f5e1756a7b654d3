"""Sweeps: run each Hydra job so that one failure does not end the sweep, and summarize them.

Every job (single run or multirun) writes ``metrics.json`` into its own output directory: its
overrides, status, final metrics and, when it failed, the error with its traceback.
:func:`summarize` reads those files back for ``scripts/summarize_sweep.py`` and for the
:class:`SweepSummary` Hydra callback that prints the table when a multirun ends.

This module imports neither torch nor Lightning, so the summary script starts instantly.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.csv"


def optimized_metric(cfg: DictConfig) -> str:
    """The metric a sweeper optimises: ``cfg.optimized_metric``, else ``val/fid`` when the FID
    callback is on, else ``val/loss``."""
    if cfg.get("optimized_metric"):
        return str(cfg.optimized_metric)
    callbacks = cfg.get("callbacks") or {}
    return "val/fid" if callbacks.get("fid") is not None else "val/loss"


def run_task(train: Callable[[DictConfig], Mapping[str, float]], cfg: DictConfig) -> float | None:
    """Run ``train(cfg)``, write the job's ``metrics.json`` and return the optimized metric.

    Under multirun an exception (NaN loss, out of memory, a bad value) is logged with its
    traceback and recorded as a failed job, so the sweep goes on with the next one; the return
    value is then ``None``, which Hydra's basic sweeper ignores and the Optuna sweeper records as
    a failed trial (a NaN return would crash the Optuna sweeper). A missing or non-finite
    optimized metric fails a multirun job too, since a sweeper cannot compare it; a single run
    only warns about it. In a single run errors raise as usual.
    """
    metric = optimized_metric(cfg)
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    record: dict[str, Any] = {
        "job": hydra_cfg.job.get("num") if hydra_cfg else None,
        "overrides": list(hydra_cfg.overrides.task) if hydra_cfg else [],
        "optimized_metric": metric,
        "direction": sweep_direction(hydra_cfg),
    }
    started = time.monotonic()
    metrics: dict[str, float] = {}
    status = "interrupted"  # until train() returns or raises (Ctrl-C, SIGTERM)
    try:
        metrics = dict(train(cfg))
        problem = metric_problem(metrics, metric)
        if problem and multirun:
            raise UnusableMetricError(problem)
        if problem:  # a single run's result is not compared with anything: keep it
            missing = metrics.get(metric) is None  # e.g. a run shorter than the FID interval
            log.log(logging.INFO if missing else logging.WARNING, problem)
        status = "completed"
    except Exception as exc:
        status = "failed"
        record["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
        if not multirun:
            raise
        log.error("Job failed, the sweep goes on: %s: %s", type(exc).__name__, exc, exc_info=True)
    finally:
        record["status"] = status
        record["metrics"] = metrics
        record["value"] = metrics.get(metric) if status == "completed" else None
        record["duration_s"] = round(time.monotonic() - started, 3)
        if hydra_cfg is not None:
            write_json(Path(hydra_cfg.runtime.output_dir) / METRICS_FILE, record)
    if status == "failed":
        release_memory()  # after the except block, which held the failed job's frames
    return record["value"]


class UnusableMetricError(ValueError):
    """The run finished but its optimized metric is missing or not finite."""


def metric_problem(metrics: Mapping[str, float], metric: str) -> str | None:
    """Why ``metrics[metric]`` cannot be handed to a sweeper, or None when it can."""
    value = metrics.get(metric)
    if value is None:
        return (
            f"optimized_metric={metric!r} was not logged by this run; it logged "
            f"{sorted(metrics)}. Set `optimized_metric=` to one of those, or make the run log "
            "it (val/fid: callbacks.fid.every_n_epochs within trainer.max_epochs)."
        )
    if not math.isfinite(value):
        return (
            f"{metric} is {value} at the end of training (diverged); lower `optimizer.lr` or "
            "set `trainer.gradient_clip_val`."
        )
    return None


def sweep_direction(hydra_cfg: DictConfig | None) -> str:
    """``maximize`` when the sweeper (Optuna) maximizes, else ``minimize``."""
    direction = OmegaConf.select(hydra_cfg, "sweeper.direction") if hydra_cfg else None
    return "maximize" if str(direction).endswith("maximize") else "minimize"


def release_memory() -> None:
    """Free what a failed job's tensors held, so an out-of-memory job does not make the next
    job of the same process run out of memory too."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan: a diverged metric is kept as NaN (Python's json reads it back).
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job record (``metrics.json`` written by :func:`run_task`) below ``sweep_dir``, in
    job order, each with its directory relative to ``sweep_dir``."""
    jobs = []
    for path in Path(sweep_dir).rglob(METRICS_FILE):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "optimized_metric" in record:  # not another tool's file
            record["dir"] = str(path.parent.relative_to(sweep_dir))
            jobs.append(record)
    return sorted(jobs, key=job_order)


def job_order(job: Mapping[str, Any]) -> tuple[bool, int, str]:
    """Hydra's job number (so job 10 comes after job 9), then the directory."""
    number = job.get("job")
    return (not isinstance(number, int), number if isinstance(number, int) else 0, job["dir"])


@dataclass
class Summary:
    """A sweep's jobs as table rows (best first) and the column groups of the table."""

    rows: list[dict[str, Any]]
    objectives: list[str]
    override_keys: list[str]
    metric_keys: list[str]

    @property
    def columns(self) -> list[str]:
        return ["job", "status", *self.objectives, *self.override_keys, *self.metric_keys, "error"]


def summarize(sweep_dir: Path) -> Summary:
    """Read the sweep's jobs: completed ones best first by their optimized metric, then the
    failed ones in job order."""
    jobs = load_jobs(sweep_dir)
    sign = -1.0 if any(job.get("direction") == "maximize" for job in jobs) else 1.0

    def rank(job: dict[str, Any]) -> tuple[bool, float]:
        value = job.get("value")
        ok = job.get("status") == "completed" and value is not None and math.isfinite(value)
        return (not ok, sign * value if ok else 0.0)

    jobs.sort(key=rank)  # stable: ties and failed jobs stay in job order
    override_keys: list[str] = []
    metric_keys: set[str] = set()
    rows = []
    for job in jobs:
        overrides = dict(o.split("=", 1) if "=" in o else (o, "") for o in job["overrides"])
        override_keys += [key for key in overrides if key not in override_keys]
        metric_keys.update(job.get("metrics", {}))
        error = job.get("error") or {}
        rows.append(
            {
                "job": job["dir"],
                "status": job.get("status"),
                **job.get("metrics", {}),
                **overrides,
                job["optimized_metric"]: job.get("value"),
                "error": f"{error['type']}: {error['message']}" if error else "",
            }
        )
    objectives = list(dict.fromkeys(job["optimized_metric"] for job in jobs))
    return Summary(rows, objectives, override_keys, sorted(metric_keys - set(objectives)))


def write_summary(sweep_dir: Path) -> Path:
    """Write ``summary.csv`` (every column) into ``sweep_dir`` and return its path."""
    summary = summarize(sweep_dir)
    path = Path(sweep_dir) / SUMMARY_FILE
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=summary.columns, restval="")
        writer.writeheader()
        writer.writerows(summary.rows)
    return path


def print_summary(sweep_dir: Path) -> None:
    """Print the table: the overrides that differ between jobs, the optimized and ``val/``
    metrics, and errors; ``summary.csv`` has every column."""
    from rich.console import Console
    from rich.table import Table

    summary = summarize(sweep_dir)
    rows = summary.rows
    varying = [
        key
        for key in summary.override_keys
        if len(rows) == 1 or len({str(row.get(key)) for row in rows}) > 1
    ]
    shown = [
        "job",
        "status",
        *summary.objectives,
        *varying,
        *(key for key in summary.metric_keys if key.startswith("val/")),
    ]
    if any(row["error"] for row in rows):
        shown.append("error")
    table = Table(title=f"{len(rows)} jobs in {sweep_dir}, best first")
    for column in shown:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(format_cell(row.get(column)) for column in shown))
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # logs: don't fold


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    text = str(value)
    return text if len(text) <= 160 else text[:157] + "..."


class SweepSummary(Callback):
    """Hydra callback: prepares the sweep directory and summarizes the jobs when a multirun ends.

    The directory is made before the sweeper starts because the Optuna sweeper opens its SQLite
    study (``optuna.db``) there before any job has run.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        path = write_summary(sweep_dir)
        failed = [job["dir"] for job in load_jobs(sweep_dir) if job.get("status") != "completed"]
        print_summary(sweep_dir)
        if failed:
            log.warning("%d job(s) failed: %s (see metrics.json there)", len(failed), failed)
        log.info("Sweep summary: %s", path)
