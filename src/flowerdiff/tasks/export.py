"""``export(cfg)``: a training checkpoint's model as ``model.safetensors`` + ``config.yaml``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from flowerdiff.callbacks.ema import POSTHOC_DIR_NAME, check_sigma_rel, list_snapshots
from flowerdiff.infra.config import Problems, check_output_dir
from flowerdiff.infra.exports import export_checkpoint, is_export


def export(cfg: DictConfig) -> Path:
    """Check the paths (and the post-hoc EMA choice), then write the export; returns its
    folder."""
    problems = Problems()
    ckpt_path, out_dir = cfg.get("ckpt_path"), cfg.get("out_dir")
    if not ckpt_path:
        problems.add(
            "`ckpt_path` is missing: pass the training checkpoint to export, e.g. "
            "ckpt_path=outputs/train/runs/<date>/checkpoints/last.ckpt."
        )
    elif not Path(str(ckpt_path)).expanduser().is_file() or is_export(ckpt_path):
        problems.add(
            f"`ckpt_path={ckpt_path!r}` is not a checkpoint file. Pass a .ckpt file written by "
            "training (e.g. outputs/train/runs/<date>/checkpoints/last.ckpt)."
        )
    if not out_dir:
        problems.add("`out_dir` is missing: pass the folder to write, e.g. out_dir=exports/run1.")
    else:
        check_output_dir(out_dir, "out_dir", problems)
    posthoc = posthoc_choice(cfg, problems)
    problems.raise_if_any()
    return export_checkpoint(ckpt_path, out_dir, posthoc)


def posthoc_choice(cfg: DictConfig, problems: Problems) -> tuple[Path, float] | None:
    """``(snapshot folder, sigma_rel)`` when ``posthoc_sigma_rel`` asks for a post-hoc EMA; the
    folder defaults to the run's own (``<run dir>/posthoc_ema`` beside ``checkpoints/``)."""
    sigma_rel, folder = cfg.get("posthoc_sigma_rel"), cfg.get("posthoc_dir")
    if sigma_rel is None:
        if folder:
            problems.add(
                f"`posthoc_dir={folder!r}` is set but `posthoc_sigma_rel` is null: pass the EMA "
                "length to rebuild, e.g. posthoc_sigma_rel=0.08, or drop posthoc_dir."
            )
        return None
    try:
        check_sigma_rel(sigma_rel, "posthoc_sigma_rel")
    except ValueError as error:
        problems.add(str(error))
        return None
    ckpt_path = cfg.get("ckpt_path")
    if not folder and not ckpt_path:
        return None  # the missing checkpoint is already a problem
    if folder:
        path = Path(str(folder)).expanduser()
    else:
        path = Path(str(ckpt_path)).expanduser().parent.parent / POSTHOC_DIR_NAME
    if not list_snapshots(path):
        problems.add(
            f"`posthoc_sigma_rel={sigma_rel}` rebuilds the EMA from the run's post-hoc snapshots "
            f"(ema-<updates>-<sigma_rel>.pt), but {str(path)!r} holds none. Pass "
            "posthoc_dir=<run dir>/posthoc_ema, or train with "
            "callbacks.ema.posthoc_sigma_rels=[0.05,0.10]."
        )
        return None
    return path, float(sigma_rel)
