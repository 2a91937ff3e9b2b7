"""Neuron-level Sequential Editing (NSE): config, keys and targets, the round's update, the editor.

``config`` holds the hyperparameters and per-model presets, ``keys`` the template-averaged keys
and the target value z, ``shift`` one round's iterative multi-layer update and ``editor`` the
``Editor`` that applies and undoes it. The linear algebra shared with other methods lives in
``editing.keyspace``, C0 in ``editing.keystats`` and the editor's memory in
``editing.edit_state``. The registry is imported first so that importing ``editing.nse.editor``
directly does not meet a half-initialised ``editing.editors`` (which imports this editor).
"""

import editing.editors  # noqa: F401  (import order: see the docstring)
from editing.nse.config import PRESETS, NSEConfig, preset_for
from editing.nse.editor import NSEEditor

__all__ = ["PRESETS", "NSEConfig", "NSEEditor", "preset_for"]
