"""File helpers the audit modules share: atomic writes and content hashes of JSON values.

A report or a cached baseline is read back by a later process (a restarted daemon, ``factkeeper
report``), so it must never be half written; a hash names what a baseline was computed on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_json(value: Any) -> str:
    """The sha256 of ``value`` as JSON (non-ASCII kept), hex."""
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["sha256_json", "write_atomic"]
