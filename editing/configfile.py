"""Reading an algorithm config (a frozen dataclass) from YAML or a dict, one way for all methods.

``safe_load`` only, an empty or non-mapping file is an error, unknown keys are an error, and list
values become tuples for tuple-typed fields, so a config read back from YAML or from a snapshot's
JSON equals the one that was written.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from editing.errors import FactkeeperError

T = TypeVar("T")


class ConfigError(FactkeeperError):
    """A config file could not be read, or a value is unknown or out of range.

    The one error for an invalid configuration: an algorithm's config raises it here, the
    daemon's settings raise its subclass ``SettingsError``, which lists every problem.
    """


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (``safe_load``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping of config fields, got {type(raw).__name__}"
        )
    return raw


def dataclass_from_mapping(cls: type[T], raw: dict[str, Any]) -> T:
    """Build ``cls`` from a mapping: reject unknown keys, turn lists into tuples where typed so."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        origin = typing.get_origin(hints.get(name))
        values[name] = tuple(value) if origin is tuple and isinstance(value, list) else value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc
