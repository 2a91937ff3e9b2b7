"""Typed errors of the audits, so the daemon and the CLI can tell a bad input from a bad file."""

from __future__ import annotations

from editing.errors import FactkeeperError


class AuditError(FactkeeperError):
    """An audit cannot run or its inputs do not belong together."""


class ProbeSetError(AuditError):
    """A probe file is missing or malformed; the message names the line."""


class AuditReportError(AuditError):
    """An audit report file is not in the ``factkeeper-audit/v1`` shape."""


__all__ = ["AuditError", "AuditReportError", "ProbeSetError"]
