"""Load checkpoints for inference without executing pickled code.

Training checkpoints carry the resolved model config under ``flowerdiff_config``, so a
checkpoint alone rebuilds its module; ``weights_only=True`` refuses anything but tensors and
plain containers, so a crafted file cannot run code on load.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from flowerdiff.build import build_module
from flowerdiff.module import DiffusionModule
from flowerdiff.validation import untrusted_targets


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe, or not written by flowerdiff."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(..., weights_only=True)`` with errors that say what went wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={str(path)!r} does not exist. Pass the path of a .ckpt file written by "
            "training (e.g. outputs/train/runs/<date>/checkpoints/last.ckpt)."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"Refusing to load {str(path)!r}: it holds objects other than tensors and plain "
            f"containers, and loading them would execute code ({error}). Only load checkpoints "
            "you trust; flowerdiff's own checkpoints load safely."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r} ({type(error).__name__}: {error}). The "
            "file is truncated or not a PyTorch checkpoint; use another (e.g. last.ckpt or a "
            "periodic epoch_*.ckpt)."
        ) from error


def check_trusted(config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``config`` read from ``path``, if it only names flowerdiff's own model parts: a crafted
    config could otherwise make ``instantiate`` call any importable function."""
    untrusted = untrusted_targets(config)
    if untrusted:
        raise CheckpointError(
            f"Refusing to build the model stored in {str(path)!r}: its config names classes or "
            f"functions that are not parts of a flowerdiff model ({'; '.join(untrusted)}), and "
            "instantiating them could run arbitrary code. Only load files you trust; "
            "flowerdiff's own checkpoints and exports use flowerdiff.* and torch.optim.* classes."
        )
    return config


def build_trusted_module(config: dict[str, Any], path: str | Path) -> DiffusionModule:
    """``build_module`` for a config read from a file (see :func:`check_trusted`)."""
    return build_module(check_trusted(config, path))


def load_config(path: str | Path) -> dict[str, Any]:
    """The config stored in a checkpoint or an export, checked like :func:`load_module` does;
    for callers that instantiate parts of it (e.g. the ``data`` node)."""
    if Path(path).is_dir() or Path(path).suffix == ".safetensors":
        from flowerdiff.export import read_export  # flowerdiff.export imports this module

        return check_trusted(read_export(path)[1], path)
    return check_trusted(load_checkpoint(path).get("flowerdiff_config") or {}, path)


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """The module a training checkpoint describes, with its weights (the EMA weights when EMA
    was on: Lightning's EMAWeightAveraging stores them as the checkpoint's ``state_dict``).

    Also takes an export of scripts/export.py: its folder or its ``.safetensors`` file.
    """
    if Path(path).is_dir() or Path(path).suffix == ".safetensors":
        from flowerdiff.export import load_export  # flowerdiff.export imports this module

        return load_export(path, map_location)
    return load_training_checkpoint(path, map_location)[0]


def load_training_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[DiffusionModule, dict[str, Any]]:
    """The module a training checkpoint rebuilds (in eval mode), and the raw checkpoint."""
    checkpoint = load_checkpoint(path, map_location)
    config = checkpoint.get("flowerdiff_config")
    if not config or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{str(path)!r} is not a flowerdiff training checkpoint (no 'flowerdiff_config' or "
            "'state_dict' inside). Use a checkpoint written by scripts/train.py."
        )
    module = build_trusted_module(config, path)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval().to(map_location), checkpoint
