"""Editors by name, and method specs (``emsedit+mask:steps=1``) to editors.

Adding a method = one entry in ``EDITORS``; nothing else in the project branches on the method.
This is the one module that imports the editor classes, and editor modules import
``editing.editors.base`` only, never this one, so there is no import cycle to order around.
An entry names its class as ``module:Class`` and the module is imported when the class is first
looked up: listing and checking names (the daemon's settings do it when they load) then costs no
torch or transformers import, which takes seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from editing.errors import EditError

if TYPE_CHECKING:
    from editing.editors.base import Editor


class _Registry(Mapping[str, "type[Editor]"]):
    """Name -> editor class; a class's module is imported on its first lookup."""

    def __init__(self, targets: Mapping[str, str]) -> None:
        self._targets = dict(targets)

    def __getitem__(self, name: str) -> type[Editor]:
        module, _, attribute = self._targets[name].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def __contains__(self, name: object) -> bool:  # without importing the class
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


EDITORS: Mapping[str, type[Editor]] = _Registry(
    {
        "none": "editing.editors.noop:NoEdit",
        "ft": "editing.editors.ft:FineTuneL",
        "emsedit": "editing.emsedit.editor:EMSEditEditor",
        "nse": "editing.nse.editor:NSEEditor",
        "memory": "editing.memory.editor:MemoryEditor",
    }
)
"""Every editing method by its name (each class's ``name``)."""


def get_editor(name: str, **options: Any) -> Editor:
    """An editor by method spec: a registry name, optionally with safeguards and options.

    ``emsedit`` is the plain editor; ``emsedit+safeguards`` wraps it with every safeguard of
    ``editing.safeguards`` and ``emsedit+mask`` with one (``rewind``, ``mask``, ``preserve``,
    ``normguard``); ``emsedit:steps=1`` passes ``steps=1`` to the editor, and an option named
    like a ``SafeguardConfig`` field (``emsedit+safeguards:mask_p=0.9``) sets that field.
    ``options`` go to the inner editor too.
    """
    base, guards, spec_options = parse_method(name)
    if base not in EDITORS:
        raise EditError(f"unknown editor {base!r}; known: {', '.join(sorted(EDITORS))}")
    cls = EDITORS[base]
    from editing.safeguard_config import SafeguardConfig
    from editing.safeguards import GuardedEditor

    guard_fields = set(SafeguardConfig.__dataclass_fields__) if guards else set()
    guard_options = {k: v for k, v in spec_options.items() if k in guard_fields}
    inner_options = {k: v for k, v in spec_options.items() if k not in guard_fields}
    known = cls.option_names()
    unknown = sorted(set(inner_options) - known)
    if unknown:  # before the constructor, whose TypeError would not say which spec is wrong
        raise EditError(
            f"method {name!r}: {', '.join(unknown)} is not an option of {base} "
            f"(its options: {', '.join(sorted(known)) or 'none'})"
        )
    editor = cls(**{**inner_options, **options})
    if not guards:
        return editor
    return GuardedEditor(editor, SafeguardConfig.only(guards, **guard_options))


def parse_method(spec: str) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """``base+guard+guard:key=value:key=value`` -> (base, guards, options)."""
    head, *items = spec.split(":")
    base, *guards = head.split("+")
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise EditError(f"method {spec!r}: options are key=value, got {item!r}")
        options[key] = _parse_value(raw)
    return base, tuple(guards), options


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


__all__ = ["EDITORS", "get_editor", "parse_method"]
