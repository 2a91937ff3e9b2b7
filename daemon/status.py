"""What ``factkeeper status`` reports: the journal's view plus the running daemon's readiness."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from daemon.config import Settings
from daemon.records.journal import Journal


def daemon_status(settings: Settings, timeout_s: float = 2.0) -> dict[str, Any]:
    """Journal counts, last offsets and readiness (``ready`` is False when nothing answers).

    ``superseded`` counts the applied corrections that a newer one of the same fact replaced;
    they are in ``events["applied"]`` too.
    """
    report: dict[str, Any] = {"journal": str(settings.journal.path)}
    if settings.journal.path.exists():
        with Journal.open(settings.journal.path, create=False) as journal:
            report["events"] = journal.counts_by_status()
            # Not a status: applied corrections a newer one of the same fact replaced.
            report["superseded"] = journal.superseded_count()
            report["last_offsets"] = {
                f"{topic}:{partition}": offset
                for (topic, partition), offset in sorted(journal.last_offsets().items())
            }
            report["last_seq"] = journal.last_seq()
    host = "127.0.0.1" if settings.metrics.host in ("0.0.0.0", "::") else settings.metrics.host
    url = f"http://{host}:{settings.metrics.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            report.update(json.loads(resp.read()))
    except urllib.error.HTTPError as err:
        report.update(json.loads(err.read() or b"{}"))
    except (OSError, ValueError):
        report["ready"] = False
        report["daemon"] = f"not answering at {url}"
    return report
