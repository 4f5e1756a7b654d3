"""Read training checkpoints as data: tensors and plain containers only, the model by name.

``torch.load(weights_only=True)`` refuses pickled objects, so opening a file cannot run code;
the model description inside is a :class:`~flowerdiff.training.spec.ModelSpec` (plain values,
registry names), checked strictly before anything is built; the network is first built on the
meta device and its parameter shapes compared with the stored weights, so a file that does not
describe its own weights is refused without allocating anything.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowerdiff.diffusion import Diffusion
from flowerdiff.training.module import CHECKPOINT_KEY, DiffusionModule
from flowerdiff.training.spec import ModelSpec, SpecError

# Lightning's EMAWeightAveraging and flowerdiff's EMA store the raw weights here and the
# averaged ones as the checkpoint's state_dict.
RAW_WEIGHTS_KEY = "current_model_state"
WEIGHT_CHOICES = ("ema", "raw")
# A module state dict: the network's weights, and what the diffusion process learns for training
# only (EDM2's loss weighting head), which sampling never uses.
NETWORK_PREFIX, PROCESS_PREFIX = "net.", "diffusion."


class CheckpointError(RuntimeError):
    """A checkpoint or export that is missing, unsafe, or not written by flowerdiff."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(..., weights_only=True)`` with errors that say what went wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={str(path)!r} does not exist. Pass the path of a .ckpt file written by "
            "training (e.g. outputs/train/runs/<date>/checkpoints/last.ckpt) or an export folder."
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"ckpt_path={str(path)!r} is not a PyTorch checkpoint (not a zip archive: truncated, "
            "or another kind of file). Use another checkpoint, e.g. last.ckpt or a periodic "
            "epoch_*.ckpt of the same run."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"Refusing to load {str(path)!r}: it holds objects other than tensors and plain "
            f"containers, and loading them could execute code ({str(error).splitlines()[0]}). "
            "Only load checkpoints you trust; flowerdiff's own checkpoints load safely."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). The file is truncated or "
            "damaged; use another (e.g. last.ckpt or a periodic epoch_*.ckpt)."
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint."
        )
    return checkpoint


def checkpoint_spec(checkpoint: dict[str, Any], source: str | Path) -> ModelSpec:
    """The ModelSpec stored in a training checkpoint, checked against the checkpoint's own
    weights (the averaged and, when present, the raw ones) on the meta device, so resuming a
    damaged or edited file fails here with its name, not inside Lightning's state-dict load."""
    if CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{str(source)!r} is not a flowerdiff checkpoint (no {CHECKPOINT_KEY!r} model "
            "description or no 'state_dict' inside). Use a checkpoint written by "
            "scripts/train.py, or an export of scripts/export.py."
        )
    spec = parse_spec(checkpoint[CHECKPOINT_KEY], source)
    meta, diffusion = check_spec(spec, source)
    for key in ("state_dict", RAW_WEIGHTS_KEY):
        if key in checkpoint:
            network, process = _split_state(checkpoint[key], source, key)
            check_weights_fit(meta, network, source, f"weights ({key})")
            check_weights_fit(diffusion, process, source, f"diffusion weights ({key})")
    return spec


def _split_state(state: Any, source: str | Path, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A module state dict as (the network's, the diffusion process's), prefixes removed; any
    other key is refused."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(source)!r} has no state dict of tensors ({key}).")
    network: dict[str, Any] = {}
    process: dict[str, Any] = {}
    others = []
    for name, value in state.items():
        name = str(name)
        if name.startswith(NETWORK_PREFIX):
            network[name.removeprefix(NETWORK_PREFIX)] = value
        elif name.startswith(PROCESS_PREFIX):
            process[name.removeprefix(PROCESS_PREFIX)] = value
        else:
            others.append(name)
    if others:
        raise CheckpointError(
            f"The weights ({key}) in {str(source)!r} hold entries {others[:3]} that belong to no "
            "part of a flowerdiff model. The file is damaged or was edited; use the files as "
            "training wrote them."
        )
    return network, process


def parse_spec(data: Any, source: str | Path) -> ModelSpec:
    """A stored model description as a ModelSpec, refused (naming ``source``) unless it is the
    plain data flowerdiff writes: no ``${...}`` interpolation and no ``_target_``-like key
    anywhere, no unknown or missing key (:meth:`ModelSpec.from_dict`)."""
    try:
        spec = ModelSpec.from_dict(data)
        check_stored_values(data, "model")
        return spec
    except SpecError as error:
        raise CheckpointError(
            f"Refusing to build the model described in {str(source)!r}: {error}. flowerdiff only "
            "rebuilds models from the plain description its own checkpoints and exports hold."
        ) from error


def check_stored_values(value: Any, where: str, depth: int = 0) -> None:
    """Everywhere in a stored description (class names included): no string that an OmegaConf
    resolver would evaluate and no key Hydra's ``instantiate`` would act on (``_target_``,
    ``_args_``, ``_partial_``, ...). Nothing here is ever resolved or instantiated; refusing
    such files outright keeps it that way and tells the user the file was tampered with."""
    if depth > 8:
        raise SpecError(f"{where} is nested too deeply")
    if isinstance(value, str):
        if "${" in value:
            raise SpecError(
                f"{where}={value!r} is an interpolation; stored configs hold values only"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (key.startswith("_") or "${" in key):
                raise SpecError(
                    f"{where} has the key {key!r}: an instantiation key or interpolation; "
                    "stored configs name components by registry name only"
                )
            check_stored_values(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_stored_values(item, f"{where}[{index}]", depth + 1)


def check_spec(spec: ModelSpec, source: str | Path) -> tuple[nn.Module, Diffusion]:
    """Build what ``spec`` describes without allocating memory: the network on the meta device
    and the diffusion (a few small tables). A component that refuses its arguments, a network
    that does not take images of ``spec.image_shape`` and a diffusion config that the family
    would not write back the same way (e.g. a mapping where a flag belongs) are refused."""
    try:
        with torch.device("meta"):
            meta = spec.build_network()
        diffusion = spec.build_diffusion()
        channels, height, width = spec.image_shape
        check_size = getattr(meta, "check_image_size", None)
        if check_size is not None and height != width:
            check_size(height)
        for key in ("in_channels", "out_channels"):
            if getattr(meta, key, channels) != channels:
                raise ValueError(
                    f"network.{key}={getattr(meta, key)} does not match image_shape "
                    f"{list(spec.image_shape)}"
                )
        mismatch = _first_difference(spec.diffusion, diffusion.to_config(), "diffusion")
        if mismatch:
            raise ValueError(f"{mismatch}: not a value the diffusion component accepts as stored")
    except Exception as error:  # anything a stored description makes a constructor raise
        raise CheckpointError(
            f"Refusing to build the model described in {str(source)!r}: {error}"
        ) from error
    return meta, diffusion


def _first_difference(stored: Any, canonical: Any, where: str) -> str | None:
    """The first key whose stored value differs from what the built component reports (keys
    the component adds, e.g. defaults, are fine)."""
    if isinstance(stored, dict) and isinstance(canonical, dict):
        for key, value in stored.items():
            if key not in canonical:
                return f"{where}.{key} is not an option of the built component"
            found = _first_difference(value, canonical[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(stored, list | tuple) and isinstance(canonical, list | tuple):
        if len(stored) != len(canonical):
            return f"{where}={stored!r}"
        for index, (a, b) in enumerate(zip(stored, canonical, strict=True)):
            found = _first_difference(a, b, f"{where}[{index}]")
            if found:
                return found
        return None
    if type(stored) is not type(canonical) and not (
        isinstance(stored, int | float)
        and isinstance(canonical, int | float)
        and not isinstance(stored, bool)
        and not isinstance(canonical, bool)
    ):
        return f"{where}={stored!r}"
    return None if stored == canonical else f"{where}={stored!r}"


def check_weights_fit(
    module: nn.Module, weights: Any, source: str | Path, what: str = "weights"
) -> None:
    """The tensors of ``weights`` (a state dict, no prefix) are exactly the parameters and
    persistent buffers of ``module`` (the meta network, or the diffusion process): same
    names, same shapes."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{str(source)!r} has no state dict of tensors ({what}).")
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items() if isinstance(t, torch.Tensor)}
    if expected != found or len(found) != len(weights):
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(str(k) for k in set(weights) - set(expected))[:3]
        wrong = [n for n in expected if n in found and expected[n] != found[n]][:3]
        raise CheckpointError(
            f"The {what} in {str(source)!r} do not fit the model it describes (missing "
            f"{missing}, unexpected {extra}, other shapes {wrong}). The file is damaged or was "
            "edited; use the files as training or scripts/export.py wrote them."
        )


def build_from_spec(
    spec: ModelSpec, weights: dict[str, torch.Tensor], source: str | Path
) -> DiffusionModule:
    """The module a spec describes, with ``weights`` (network state dict, no prefix).

    The network is built on the meta device first: a description that names an unknown
    component, a bad value, or shapes that differ from the weights is refused before any
    memory is allocated.
    """
    meta, diffusion = check_spec(spec, source)
    check_weights_fit(meta, weights, source)
    net = spec.build_network()
    net.load_state_dict(weights)
    return DiffusionModule(net, diffusion, spec.image_shape, spec).eval()


def network_weights(
    checkpoint: dict[str, Any], source: str | Path, weights: str = "ema"
) -> dict[str, torch.Tensor]:
    """The network's state dict: the EMA weights (the checkpoint's ``state_dict`` when training
    averaged them, else the only weights there are), or the raw training weights."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"`weights={weights!r}` must be one of {', '.join(WEIGHT_CHOICES)}.")
    key = "state_dict"
    if weights == "raw" and RAW_WEIGHTS_KEY in checkpoint:
        key = RAW_WEIGHTS_KEY
    elif weights == "raw":
        raise CheckpointError(
            f"{str(source)!r} holds one set of weights (training ran without EMA): use "
            "weights=ema, which are those weights."
        )
    return _split_state(checkpoint[key], source, key)[0]


def has_raw_weights(checkpoint: dict[str, Any]) -> bool:
    return RAW_WEIGHTS_KEY in checkpoint


def load_training_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", weights: str = "ema"
) -> tuple[DiffusionModule, dict[str, Any]]:
    """The module a training checkpoint rebuilds (in eval mode), and the raw checkpoint."""
    checkpoint = read_checkpoint(path, "cpu")
    spec = checkpoint_spec(checkpoint, path)
    module = build_from_spec(spec, network_weights(checkpoint, path, weights), path)
    return module.to(map_location), checkpoint
