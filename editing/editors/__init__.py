"""Editors by name. Adding a method = one import and one entry in ``EDITORS``; nothing else in
the project branches on the method. Editor modules import from ``editing.editors.base`` only.
"""

from __future__ import annotations

from typing import Any

from editing.editors.base import EditError, Editor, EditResult
from editing.editors.ft import FineTuneL
from editing.editors.noop import NoEdit
from editing.emsedit.editor import EMSEditEditor
from editing.nse.editor import NSEEditor

EDITORS: dict[str, type[Editor]] = {
    NoEdit.name: NoEdit,
    FineTuneL.name: FineTuneL,
    EMSEditEditor.name: EMSEditEditor,
    NSEEditor.name: NSEEditor,
}


def get_editor(name: str, **options: Any) -> Editor:
    """An editor by method spec: a registry name, optionally with safeguards and options.

    ``emsedit`` is the plain editor; ``emsedit+safeguards`` wraps it with every safeguard of
    ``editing.safeguards`` and ``emsedit+mask`` with one (``rewind``, ``mask``, ``preserve``,
    ``normguard``); ``emsedit:steps=1`` passes ``steps=1`` to the editor, and an option named
    like a ``SafeguardConfig`` field (``emsedit+safeguards:mask_p=0.9``) sets that field.
    ``options`` go to the inner editor too.
    """
    base, guards, spec_options = parse_method(name)
    try:
        cls = EDITORS[base]
    except KeyError:
        raise EditError(f"unknown editor {base!r}; known: {', '.join(sorted(EDITORS))}") from None
    from editing.safeguards import GuardedEditor, SafeguardConfig

    guard_fields = set(SafeguardConfig.__dataclass_fields__) if guards else set()
    guard_options = {k: v for k, v in spec_options.items() if k in guard_fields}
    inner_options = {k: v for k, v in spec_options.items() if k not in guard_fields}
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


__all__ = ["EDITORS", "EditError", "EditResult", "Editor", "get_editor", "parse_method"]
