"""``audit.on_failure``: a failed gate quarantines and rolls back, or (``warn``) only warns.

The runner is driven with a fixed audit result and stand-ins for the version keeper and the
history, so the test is about what the runner does with the verdict, not about measuring.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon.audits.runner import AuditRunner
from daemon.config import load_settings
from daemon.records.journal import Journal
from monitoring.metrics import FactkeeperMetrics
from tests.daemon.test_journal import applied
from tests.monitoring.test_gates import _result

FAILING = _result(locality=0.04)  # the shipped EMSEdit after 100 edits on SmolLM2


@dataclass
class FakeVersions:
    """The parts of ``VersionKeeper`` the runner uses: version "2" is judged, "1" is production."""

    current_version: str = "2"
    promoted: list[str] = field(default_factory=list)
    registry: Any = field(
        default_factory=lambda: SimpleNamespace(log_metrics=lambda *a: None, tag=lambda *a: None)
    )

    def snapshot(self, reason: str) -> None:
        pass

    def production(self) -> str:
        return "1"

    def promote(self, version: str) -> None:
        self.promoted.append(version)

    def read(self, version: str) -> tuple[dict, Any]:
        return {}, SimpleNamespace(event_ids=[])


@dataclass
class FakeHistory:
    rollbacks: list[tuple[str, str]] = field(default_factory=list)

    def rollback(self, version: str, reason: str) -> None:
        self.rollbacks.append((version, reason))


def _run(tmp_path: Path, on_failure: str | None) -> tuple[Any, FakeVersions, FakeHistory, Journal]:
    env = {"FACTKEEPER_HOME": str(tmp_path)}
    if on_failure is not None:
        env["FACTKEEPER_AUDIT__ON_FAILURE"] = on_failure
    settings = load_settings(None, env=env)
    journal = Journal.open(tmp_path / "journal.sqlite3")
    journal.record_batch([applied("cf:1", 0)])
    versions, history = FakeVersions(), FakeHistory()
    auditor = SimpleNamespace(run=lambda facts, resume_layer=0: FAILING)
    runner = AuditRunner(
        settings,
        auditor,  # type: ignore[arg-type]
        journal,
        versions,  # type: ignore[arg-type]
        history,  # type: ignore[arg-type]
        FactkeeperMetrics(),
        tmp_path / "audits",
    )
    runner.resume_layer = lambda: 0  # type: ignore[method-assign]
    return runner.run("requested", producer=None), versions, history, journal


def test_default_failure_quarantines_and_rolls_back(tmp_path: Path) -> None:
    report, versions, history, journal = _run(tmp_path, None)
    assert report.action == "rolled_back"
    assert history.rollbacks == [("1", "audit-gate")]
    assert journal.get("cf:1").status == "quarantined"
    assert versions.promoted == []


def test_warn_keeps_the_edits_and_production(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.audits.runner"):
        report, versions, history, journal = _run(tmp_path, "warn")
    assert report.action == "warned"
    assert report.quarantined_event_ids == ()
    assert history.rollbacks == [] and versions.promoted == []
    assert journal.get("cf:1").status == "applied"
    assert any("audit gate failed" in r.getMessage() for r in caplog.records)
    (written,) = (tmp_path / "audits").glob("audit-*.json")
    saved = json.loads(written.read_text())
    assert saved["action"] == "warned" and saved["gate"]["passed"] is False
    assert any("locality" in reason for reason in saved["gate"]["reasons"])


def test_on_failure_accepts_only_known_actions(tmp_path: Path) -> None:
    from daemon.errors import SettingsError

    with pytest.raises(SettingsError, match="audit.on_failure"):
        load_settings(None, env={"FACTKEEPER_AUDIT__ON_FAILURE": "ignore"})
