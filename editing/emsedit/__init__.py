"""EMSEdit: meta-learned multi-step model editing (arXiv 2508.04012), see ``README.md`` here.

``config`` (settings), ``nets`` (hypernetwork), ``keys`` (key/gradient capture), ``shift`` (ridge
aggregation and its implicit gradient), ``editor`` (the editor), ``train`` (meta-training),
``checkpoint`` (safetensors + JSON). The registry is imported first so that importing
``editing.emsedit.editor`` directly does not meet a half-initialised ``editing.editors`` (which
itself imports this package's editor).
"""

import editing.editors  # noqa: F401  (import order: see the docstring)
