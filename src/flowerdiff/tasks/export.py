"""``export(cfg)``: a training checkpoint's model as ``model.safetensors`` + ``config.yaml``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from flowerdiff.infra.config import Problems, check_output_dir
from flowerdiff.infra.exports import export_checkpoint, is_export


def export(cfg: DictConfig) -> Path:
    """Check the two paths, then write the export; returns its folder."""
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
    problems.raise_if_any()
    return export_checkpoint(ckpt_path, out_dir)
