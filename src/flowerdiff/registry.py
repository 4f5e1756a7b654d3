"""Name -> class registries: how configs (and files from elsewhere) choose a component.

A config names a network, a diffusion family, a sampler, a noise schedule or a data source by a
short registry name (``name: unet``), never by an import path. Building one is a dictionary
lookup followed by the constructor, so a checkpoint or an export can only ever select among the
classes registered here: it cannot make the program call anything it names. Adding a component
is one decorator line (see the README's "Extending flowerdiff").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of constructors of one kind (``"sampler"``, ``"network"`` ...)."""

    def __init__(self, kind: str, config_key: str, name_key: str | None = None) -> None:
        self.kind = kind
        self.config_key = config_key  # where the config holds it, for messages
        self.name_key = name_key or f"{config_key}.name"  # where its name is
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@SAMPLERS.register("heun")`` above a class makes ``name: heun`` work."""

        def add(constructor: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} name {name!r} is registered twice.")
            self._entries[name] = constructor
            return constructor

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: Any) -> Callable[..., T]:
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(
                f"`{self.name_key}={name!r}` is not a known {self.kind}. Valid values are "
                f"{', '.join(map(repr, self.names()))}."
            )
        return self._entries[name]

    def name_of(self, constructor: Callable[..., Any]) -> str:
        """The registry name of a class (its instances' ``to_config()`` use it)."""
        for name, entry in self._entries.items():
            if entry is constructor:
                return name
        raise KeyError(f"{constructor!r} is not a registered {self.kind}")

    def build(self, config: Mapping[str, Any], **extra: Any) -> T:
        """``config = {"name": ..., **kwargs}`` -> the component, or one ValueError that names the
        bad key and the valid ones. ``extra`` are arguments the caller supplies itself."""
        if not isinstance(config, Mapping):
            raise ValueError(
                f"`{self.config_key}` must be a mapping with a `name` key (one of "
                f"{', '.join(map(repr, self.names()))}); got {type(config).__name__}."
            )
        kwargs = {key: value for key, value in config.items() if key != "name"}
        constructor = self.get(config.get("name"))
        check_keys(constructor, kwargs, self.config_key, exclude=extra)
        return constructor(**kwargs, **extra)


def accepted_keys(constructor: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments ``constructor`` takes; None when it takes ``**kwargs``."""
    parameters = inspect.signature(constructor).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.name != "self"]


def check_keys(
    constructor: Callable[..., Any],
    kwargs: Mapping[str, Any],
    config_key: str,
    exclude: Mapping[str, Any] | None = None,
    also_valid: Sequence[str] = (),
    named: bool = True,
) -> None:
    """Raise a ValueError naming every key of ``kwargs`` that ``constructor`` does not accept.

    ``also_valid``: keys the caller consumes itself before ``constructor`` sees the rest (e.g. a
    schedule's ``num_timesteps``), listed as valid in the message. ``named``: the config node
    also has a ``name`` key (a registry entry), which the message lists first."""
    valid = accepted_keys(constructor)
    if valid is None:
        return
    valid = [
        *also_valid,
        *(key for key in valid if key not in (exclude or {}) and key not in also_valid),
    ]
    unknown = [key for key in kwargs if key not in valid]
    if unknown:
        listed = ["name", *valid] if named else valid
        name = getattr(constructor, "__name__", str(constructor))
        raise ValueError(
            f"{', '.join(f'`{config_key}.{key}`' for key in unknown)} "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of {name}. "
            f"Valid keys under `{config_key}` are: {', '.join(listed)}. Remove "
            f"{'it' if len(unknown) == 1 else 'them'} (e.g. `~{config_key}.{unknown[0]}` on the "
            "command line) or fix the spelling."
        )
