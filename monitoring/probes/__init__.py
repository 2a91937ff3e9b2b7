"""The bundled locality probe set (data) and the script that selected it (``build``)."""
