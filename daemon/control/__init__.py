"""The control plane: commands that pause, audit, snapshot, roll back or revert the daemon.

``commands`` says what a valid control command is, ``auth`` who may send one (a bearer token over
HTTP, HMAC-signed records on the control topic), and ``admin`` serves the authenticated HTTP
endpoint. The consumer loop executes the commands between batches.
"""
