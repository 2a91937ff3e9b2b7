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
    """An editor instance by registry name."""
    try:
        cls = EDITORS[name]
    except KeyError:
        raise EditError(f"unknown editor {name!r}; known: {', '.join(sorted(EDITORS))}") from None
    return cls(**options)


__all__ = ["EDITORS", "EditError", "EditResult", "Editor", "get_editor"]
