"""Trained editors shipped with factkeeper, one folder per model (package data).

``editing.emsedit.checkpoint.default_checkpoint`` finds them through ``importlib.resources``,
so an installed wheel edits without the source checkout.
"""
