"""Export a checkpoint's network as safetensors + YAML, and load such an export back.

A training checkpoint is tied to torch's pickle format and to Lightning's layout, and is 3x the
weights because of the optimizer state. The export keeps what inference needs: the network
weights (the EMA ones when EMA was on) in ``model.safetensors`` (no code can ride along in that
format) and the :class:`~flowerdiff.training.spec.ModelSpec` in ``config.yaml``. The spec is also
embedded in the safetensors metadata, so the ``.safetensors`` file alone is enough; a
``config.yaml`` beside it wins (edit it, e.g., to change the default sampler).

``config.yaml`` is read as plain data: YAML tags, anchors and aliases are refused, and the
spec holds no interpolation, so nothing in the file is ever resolved, imported or called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from flowerdiff.callbacks.ema import latest_snapshot, with_posthoc_weights
from flowerdiff.files import atomic_write
from flowerdiff.infra.checkpoints import (
    CheckpointError,
    build_from_spec,
    load_training_checkpoint,
    parse_spec,
    read_checkpoint,
)
from flowerdiff.training.module import DiffusionModule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
EXPORT_FORMAT = "flowerdiff-export/2"
MAX_CONFIG_BYTES = 1 << 20


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, posthoc: tuple[Path, float] | None = None
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml``; return ``out_dir``.
    ``posthoc=(folder, sigma_rel)`` exports the post-hoc EMA of that length instead of the
    checkpoint's EMA, rebuilt from the run's snapshots taken up to the checkpoint."""
    module, checkpoint = load_training_checkpoint(ckpt_path)
    assert module.spec is not None
    spec = module.spec.to_dict()
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "source_checkpoint": str(Path(ckpt_path).resolve()),
        "global_step": int(checkpoint.get("global_step", -1)),
        "epoch": int(checkpoint.get("epoch", -1)),
        "ema_weights": "current_model_state" in checkpoint,
    }
    if posthoc is not None:
        info["posthoc_ema"] = apply_posthoc(module, checkpoint, ckpt_path, *posthoc)
    tensors = {
        name: value.detach().cpu().contiguous() for name, value in module.net.state_dict().items()
    }
    metadata = {key: str(value) for key, value in info.items()}
    metadata["model"] = json.dumps(spec)
    out_dir = Path(out_dir).expanduser()
    data = save(tensors, metadata=metadata)
    atomic_write(out_dir / WEIGHTS_FILE, lambda file: file.write(data))
    text = yaml.safe_dump({"model": spec, "export": info}, sort_keys=False)
    atomic_write(out_dir / CONFIG_FILE, lambda file: file.write(text.encode()))
    return out_dir


def ema_update_count(checkpoint: dict[str, Any]) -> int:
    """The EMA callback's update count stored in a checkpoint (its global step without one:
    the EMA never updates more than once per optimizer step)."""
    for state in (checkpoint.get("callbacks") or {}).values():
        count = state.get("num_updates") if isinstance(state, dict) else None
        if isinstance(count, int) and not isinstance(count, bool):
            return count
    return int(checkpoint.get("global_step", -1))


def apply_posthoc(
    module: DiffusionModule,
    checkpoint: dict[str, Any],
    ckpt_path: str | Path,
    folder: Path,
    sigma_rel: float,
) -> dict[str, Any]:
    """Load into ``module`` the post-hoc EMA at ``sigma_rel`` as of the checkpoint's update
    count; returns what the export records about it."""
    count = ema_update_count(checkpoint)
    updates = latest_snapshot(folder, count)
    if updates is None:
        raise CheckpointError(
            f"`posthoc_dir={str(folder)!r}` has no post-hoc EMA snapshots from before "
            f"{str(ckpt_path)!r} (update {count}): export a later checkpoint of that run, or "
            "pass the posthoc_ema folder of the run that wrote it."
        )
    try:
        state = with_posthoc_weights(
            module.state_dict(), folder, sigma_rel, updates, load=read_checkpoint
        )
    except ValueError as error:
        raise CheckpointError(f"Cannot rebuild the post-hoc EMA: {error}") from error
    module.load_state_dict(state)
    return {"sigma_rel": sigma_rel, "updates": updates, "folder": str(folder.resolve())}


def load_plain_yaml(text: str, source: str | Path) -> Any:
    """YAML as plain data: tags (``!!python/...``), anchors and aliases are refused."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise CheckpointError(
                    f"Refusing {str(source)!r}: it uses YAML anchors/aliases, which flowerdiff's "
                    "exports never contain. Export the checkpoint again with scripts/export.py."
                )
            # Any explicit tag (`!!python/object:...`, `!!str`, a local `!tag`) on a scalar or
            # a collection: untagged plain YAML leaves `tag` unset.
            tag = getattr(event, "tag", None)
            if tag is not None and tag != "!":
                raise CheckpointError(
                    f"Refusing {str(source)!r}: it uses the YAML tag {tag!r}; exports hold plain "
                    "values only. Export the checkpoint again with scripts/export.py."
                )
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CheckpointError(f"{str(source)!r} is not valid YAML ({error}).") from error


def read_export(path: str | Path) -> tuple[Path, dict[str, Any], Path]:
    """(weights file, stored model description, where the description came from)."""
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
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{str(config_path)!r} is too large to be an export's config.")
        document = load_plain_yaml(config_path.read_text(), config_path)
        if not isinstance(document, dict) or set(document) - {"model", "export"}:
            raise CheckpointError(
                f"{str(config_path)!r} must hold `model:` (and `export:`) only; export the "
                "checkpoint again with scripts/export.py."
            )
        return weights, document.get("model"), config_path
    try:
        return weights, json.loads(metadata["model"]), weights
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{str(weights)!r} has no readable model description.") from error


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """The module of an export: its folder, or its ``.safetensors`` file."""
    weights_path, description, source = read_export(path)
    spec = parse_spec(description, source)
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"Could not read {str(weights_path)!r} as safetensors ({error}). The file is "
            "truncated; export the checkpoint again with scripts/export.py."
        ) from error
    return build_from_spec(spec, weights, source).to(map_location)


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors"


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", weights: str = "ema"
) -> DiffusionModule:
    """The model of a training checkpoint (``.ckpt``) or an export (folder or
    ``.safetensors``), in eval mode. ``weights="raw"`` picks a checkpoint's training weights
    instead of its EMA weights."""
    if is_export(path):
        if weights != "ema":
            raise CheckpointError(
                f"{str(path)!r} is an export, which holds one set of weights; use weights=ema."
            )
        return load_export(path, map_location)
    return load_training_checkpoint(path, map_location, weights)[0]
