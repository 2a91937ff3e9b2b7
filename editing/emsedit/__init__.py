"""EMSEdit: meta-learned multi-step model editing (arXiv 2508.04012), see ``README.md`` here.

``config`` (settings), ``nets`` (hypernetwork), ``keys`` (key/gradient capture), ``shift`` (ridge
aggregation and its implicit gradient), ``editor`` (the editor), ``train`` (meta-training),
``checkpoint`` (safetensors + JSON).
"""
