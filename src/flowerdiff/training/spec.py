"""ModelSpec: everything that rebuilds a trained model, and nothing else.

A checkpoint or an export stores the network's config, the diffusion config (its default
sampler included), the image shape and the class names, as plain data. Never the data,
optimizer or logger configs, and never an import path: the network and the diffusion are
rebuilt by registry name, so a spec read from a file can only choose among flowerdiff's own
classes. :meth:`ModelSpec.from_dict` is strict: an unknown or missing key, or a value of the
wrong type, is refused before anything is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from flowerdiff.diffusion import Diffusion, build_diffusion
from flowerdiff.models import NETWORKS

SPEC_FORMAT = "flowerdiff-model/2"
SPEC_KEYS = ("format", "network", "diffusion", "image_shape", "class_names")
MAX_IMAGE_SIDE = 4096  # bounds the memory a stored description can make sampling ask for


class SpecError(ValueError):
    """A stored model description that does not describe a flowerdiff model."""


@dataclass(frozen=True)
class ModelSpec:
    """What a trained model is: network + diffusion + image shape (+ class names)."""

    network: dict[str, Any]
    diffusion: dict[str, Any]
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, dicts, strings and numbers only (YAML, JSON and ``weights_only``-safe)."""
        return {
            "format": SPEC_FORMAT,
            "network": _plain(self.network),
            "diffusion": _plain(self.diffusion),
            "image_shape": list(self.image_shape),
            "class_names": list(self.class_names) if self.class_names is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        """Parse a stored spec; :class:`SpecError` names what is wrong."""
        if not isinstance(data, Mapping):
            raise SpecError(f"the model description is a {type(data).__name__}, not a mapping")
        unknown = sorted(str(key) for key in data if key not in SPEC_KEYS)
        missing = [key for key in SPEC_KEYS[:4] if key not in data]
        if unknown or missing:
            raise SpecError(
                f"the model description has unknown keys {unknown} and lacks {missing}; "
                f"expected exactly {list(SPEC_KEYS)}"
            )
        if data["format"] != SPEC_FORMAT:
            raise SpecError(f"format {data['format']!r} is not {SPEC_FORMAT!r}")
        shape = data["image_shape"]
        if not (
            isinstance(shape, list | tuple)
            and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            and shape[0] <= 64
            and max(shape[1:]) <= MAX_IMAGE_SIDE
        ):
            raise SpecError(
                f"image_shape={shape!r} is not [C, H, W] with at most 64 channels and "
                f"{MAX_IMAGE_SIDE} pixels a side"
            )
        names = data.get("class_names")
        if names is not None and not (
            isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)
        ):
            raise SpecError("class_names must be null or a list of strings")
        for key in ("network", "diffusion"):
            _check_plain(data[key], key)
        return cls(
            network=dict(data["network"]),
            diffusion=dict(data["diffusion"]),
            image_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            class_names=tuple(names) if names is not None else None,
        )

    def build_network(self) -> nn.Module:
        """The network (by registry name); check it takes this image size."""
        net = NETWORKS.build(self.network)
        check = getattr(net, "check_image_size", None)
        if check is not None:
            check(self.image_shape[-1])
        return net

    def build_diffusion(self) -> Diffusion:
        return build_diffusion(self.diffusion)

    @property
    def num_classes(self) -> int | None:
        return self.network.get("num_classes")


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so the spec serialises anywhere."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Only dicts with string keys, lists, strings, numbers, booleans and None, a few levels
    deep: anything else in a stored spec is refused."""
    if depth > 6:
        raise SpecError(f"{where} is nested too deeply")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpecError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list | tuple):
        if len(value) > 64:
            raise SpecError(f"{where} is a list of {len(value)} entries")
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", depth + 1)
    elif not (value is None or isinstance(value, bool | int | float | str)):
        raise SpecError(f"{where} holds a {type(value).__name__}")
    elif isinstance(value, str) and "${" in value:
        raise SpecError(f"{where}={value!r} is an interpolation; stored configs hold values only")
