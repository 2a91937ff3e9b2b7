"""The editors: the contract every editor meets (``base``) and one module per simple method.

Editor modules import ``editing.editors.base`` only. Editors by name, and method specs, are in
``editing.registry``, the one module that imports every editor class.
"""
