"""Export a checkpoint's network as safetensors + YAML, and load such an export back.

A training checkpoint is a pickle (safe to read with ``weights_only=True``, but tied to torch and
to Lightning's layout, and 3x bigger than the weights because of the optimizer state). The
export keeps what inference needs: the U-Net weights — the EMA weights when EMA was on, since
Lightning's EMAWeightAveraging stores them as the checkpoint's ``state_dict`` — as a plain
``UNet`` state dict in ``model.safetensors`` (no code can ride along in that format), and the
model / schedule / sampler config in ``config.yaml``. The same config is also embedded in the
safetensors metadata, so the ``.safetensors`` file alone is enough; a ``config.yaml`` beside it
wins (edit it, e.g., to change the sampler).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from flowerdiff.checkpoint import CheckpointError, build_trusted_module, load_training_checkpoint
from flowerdiff.checkpoint_io import atomic_write
from flowerdiff.module import DiffusionModule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
EXPORT_FORMAT = "flowerdiff-unet/1"
# What inference needs: the module (build_module reads data.image_size), and the data node for
# evaluate.py's reference statistics.
EXPORTED_GROUPS = ("model", "scheduler", "sampler", "data")


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml``; return ``out_dir``."""
    module, checkpoint = load_training_checkpoint(ckpt_path)
    stored = checkpoint["flowerdiff_config"]
    config: dict[str, Any] = {key: stored[key] for key in EXPORTED_GROUPS if key in stored}
    config.setdefault("data", {"image_size": module.image_shape[-1]})
    ema = "current_model_state" in checkpoint  # EMAWeightAveraging moved the raw weights there
    info = {
        "format": EXPORT_FORMAT,
        "source_checkpoint": str(Path(ckpt_path).resolve()),
        "global_step": int(checkpoint.get("global_step", -1)),
        "epoch": int(checkpoint.get("epoch", -1)),
        "ema_weights": ema,
    }
    tensors = {
        name: value.detach().cpu().contiguous() for name, value in module.net.state_dict().items()
    }
    metadata = {key: str(value) for key, value in info.items()}
    metadata["config"] = json.dumps(config)
    out_dir = Path(out_dir).expanduser()
    data = save(tensors, metadata=metadata)
    atomic_write(out_dir / WEIGHTS_FILE, lambda file: file.write(data))
    text = yaml.safe_dump({**config, "export": info}, sort_keys=False)
    atomic_write(out_dir / CONFIG_FILE, lambda file: file.write(text.encode()))
    return out_dir


def read_export(path: str | Path) -> tuple[Path, dict[str, Any], Path]:
    """(weights file, config, where the config came from) of an export folder or file."""
    path = Path(path).expanduser()
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(
            f"{str(path)!r} holds no {WEIGHTS_FILE}. Pass a folder written by scripts/export.py "
            "(or its .safetensors file), or a training checkpoint (.ckpt)."
        )
    try:
        with safe_open(weights, framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"Could not read {str(weights)!r} as safetensors ({error}). The file is truncated "
            "or not a safetensors file; export the checkpoint again with scripts/export.py."
        ) from error
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{str(weights)!r} is not a flowerdiff export (metadata format "
            f"{metadata.get('format')!r}, expected {EXPORT_FORMAT!r}). Write one with "
            "`python scripts/export.py ckpt_path=<run>/checkpoints/last.ckpt out_dir=<folder>`."
        )
    config_path = weights.with_name(CONFIG_FILE)
    if config_path.is_file():
        config, source = yaml.safe_load(config_path.read_text()), config_path
    else:
        config, source = json.loads(metadata["config"]), weights
    return weights, {key: value for key, value in config.items() if key != "export"}, source


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """The module of an export: its folder, or its ``.safetensors`` file."""
    weights, config, source = read_export(path)
    module = build_trusted_module(config, source)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"Could not read {str(weights)!r} as safetensors ({error}). The file is truncated; "
            "export the checkpoint again with scripts/export.py."
        ) from error
    try:
        module.net.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"The weights in {str(weights)!r} do not fit the model described by {str(source)!r} "
            f"({error}). Keep the config.yaml written with these weights."
        ) from error
    return module.eval().to(map_location)
