"""Structured log lines on stderr: ``time level logger message key=value ...``.

Fields passed with ``extra={...}`` are appended as ``key=value`` pairs so lines stay greppable and
machine-parsable; stdout is left to command output (``factkeeper ask`` prints only the answer).
"""

from __future__ import annotations

import logging
import sys
import time

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """Formats a record as one line with its ``extra`` fields as key=value pairs."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%SZ")
        parts = [stamp, record.levelname, record.name, record.getMessage()]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={value}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO") -> None:
    """Route the root logger to stderr once (idempotent, so tests may call it repeatedly)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if getattr(handler, "_factkeeper", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    handler._factkeeper = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # kafka-python narrates every connection at INFO; keep the daemon's own lines readable.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
