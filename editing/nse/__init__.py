"""Neuron-level Sequential Editing (NSE): config, keys and targets, the round's update, the editor.

``config`` holds the hyperparameters and per-model presets, ``keys`` the template-averaged keys
and the target value z, ``shift`` one round's iterative multi-layer update and ``editor`` the
``Editor`` that applies and undoes it. The linear algebra shared with other methods lives in
``editing.keyspace``, C0 in ``editing.keystats`` and the editor's memory in
``editing.edit_state``.
"""

from editing.nse.config import PRESETS, NSEConfig, preset_for
from editing.nse.editor import NSEEditor

__all__ = ["PRESETS", "NSEConfig", "NSEEditor", "preset_for"]
