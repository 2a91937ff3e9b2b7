"""The audit's fixed inputs: the bundled locality probe set (data), the script that selected it
(``build``) and the readers of probe sets and text samples (``load``)."""
