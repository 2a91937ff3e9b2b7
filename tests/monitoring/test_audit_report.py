"""The audit report: the ``factkeeper-audit/v1`` JSON shape, judging, files written and read."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon.audits.schedule import SCHEDULE_TRIGGERS
from monitoring.audit_report import (
    REPORT_SCHEMA,
    TRIGGERS,
    AuditReport,
    read_audit_reports,
    write_audit_report,
)
from monitoring.errors import AuditReportError
from monitoring.gates import GateDecision, GateThresholds
from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    PerplexityFigures,
    RetentionFigures,
)

EXAMPLE_REPORT = """
{"schema": "factkeeper-audit/v1", "version": "3", "previous_good_version": "2",
 "started_at": "2026-11-23T15:00:00+00:00", "seconds": 12.3, "trigger": "edits",
 "edits_total": 250, "edits_audited": 250, "sampled": false,
 "retention": {"exact_match": 0.91, "token_accuracy": 0.95, "ci95": [0.87, 0.94]},
 "generalisation": {"exact_match": 0.4, "n": 120},
 "locality": {"agreement": 0.97, "gold_accuracy": 0.95, "n": 300},
 "perplexity": {"base": 12.1, "current": 12.4, "drift": 0.025},
 "gate": {"passed": true, "reasons": [], "thresholds": {"retention_floor": 0.8,
   "locality_floor": 0.9, "max_drop": 0.05, "max_perplexity_drift": 0.1}},
 "action": "promoted", "rolled_back_to": null, "quarantined_event_ids": [],
 "failing_event_ids": []}
"""


def _result(**changes: object) -> AuditReport:
    base = AuditReport(
        started_at="2026-11-23T15:00:00+00:00",
        seconds=12.3,
        edits_total=250,
        edits_audited=250,
        sampled=False,
        retention=RetentionFigures(0.91, 0.95, (0.87, 0.94)),
        generalisation=GeneralisationFigures(None, 0),
        locality=LocalityFigures(0.97, 0.95, 300),
        perplexity=PerplexityFigures(12.1, 12.4, 0.025),
        failing_event_ids=("e1", "e7"),
        failing_total=2,
        timings={"teacher_forced_seconds": 10.0},
    )
    return AuditReport(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def _report(result: AuditReport, version: str | None = "3") -> AuditReport:
    return result.judged(
        decision=GateDecision(False, ("retention fell",)),
        thresholds=GateThresholds(),
        trigger="timer",
        version=version,
        previous_good_version="2",
        action="rolled_back",
        rolled_back_to="2",
        quarantined_event_ids=["e7"],
    )


def _shape(value: object) -> object:
    """Keys and JSON types, recursively: what the renderer relies on."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


def test_report_json_has_exactly_the_agreed_shape() -> None:
    example = json.loads(EXAMPLE_REPORT)
    data = json.loads(_report(_result()).to_json())
    assert list(data) == list(example)
    for key in ("retention", "generalisation", "locality", "perplexity", "gate"):
        assert list(data[key]) == list(example[key])
    assert list(data["gate"]["thresholds"]) == list(example["gate"]["thresholds"])
    assert data["schema"] == REPORT_SCHEMA
    assert data["generalisation"] == {"exact_match": None, "n": 0}
    assert data["retention"]["ci95"] == [0.87, 0.94]
    assert (data["trigger"], data["action"], data["rolled_back_to"]) == (
        "timer",
        "rolled_back",
        "2",
    )
    assert data["quarantined_event_ids"] == ["e7"] and data["failing_event_ids"] == ["e1", "e7"]
    parsed = AuditReport.from_dict(example)
    assert _shape(parsed.to_dict()) == _shape(example)
    assert parsed.to_dict() == example


def test_every_schedule_trigger_can_be_reported() -> None:
    assert set(SCHEDULE_TRIGGERS) < set(TRIGGERS)


def test_report_round_trips_and_rejects_other_shapes() -> None:
    report = _report(_result(generalisation=GeneralisationFigures(0.4, 120)), version=None)
    back = AuditReport.from_json(report.to_json())
    assert back == report
    assert back.timings == {} and back.failing_total == len(report.failing_event_ids)
    with pytest.raises(AuditReportError, match="trigger, gate and thresholds"):
        replace(report, gate=None)
    data = json.loads(report.to_json())
    with pytest.raises(AuditReportError, match="unknown keys"):
        AuditReport.from_dict({**data, "extra": 1})
    with pytest.raises(AuditReportError, match="missing keys"):
        AuditReport.from_dict({k: v for k, v in data.items() if k != "action"})
    with pytest.raises(AuditReportError, match="locality"):
        AuditReport.from_dict({**data, "locality": {"agreement": 1.0}})
    with pytest.raises(AuditReportError, match="schema"):
        AuditReport.from_dict({**data, "schema": "factkeeper-audit/v0"})
    with pytest.raises(AuditReportError, match="trigger"):
        AuditReport.from_dict({**data, "trigger": "cron"})
    with pytest.raises(AuditReportError, match="not valid JSON"):
        AuditReport.from_json("{")


def test_reports_are_written_atomically_under_their_time_and_read_oldest_first(
    tmp_path: Path,
) -> None:
    late = _report(_result(started_at="2026-11-23T16:30:05+01:00"), version="4")
    early = _report(_result(started_at="2026-11-23T15:00:00+00:00"), version=None)
    first = write_audit_report(tmp_path, late)
    second = write_audit_report(tmp_path, early)
    again = write_audit_report(tmp_path, early)
    assert first.name == "audit-20261123T153005-v4.json"
    assert second.name == "audit-20261123T150000-vnone.json"
    assert again.name == "audit-20261123T150000-vnone-1.json"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert read_audit_reports(tmp_path) == [early, early, late]
    assert read_audit_reports(tmp_path / "absent") == []
    (tmp_path / "audit-20990101T000000-v9.json").write_text("{}")
    with pytest.raises(AuditReportError, match="audit-20990101T000000-v9.json"):
        read_audit_reports(tmp_path)


def test_an_unjudged_audit_flattens_for_mlflow_but_is_not_written() -> None:
    result = _result()
    assert result.gate is None and not result.gate_passed
    with pytest.raises(AuditReportError, match="judged"):
        result.to_dict()
    metrics = result.metrics()
    assert metrics["audit_retention_exact_match"] == 0.91
    assert metrics["audit_retention_ci95_low"] == 0.87
    assert metrics["audit_locality_agreement"] == 0.97
    assert metrics["audit_perplexity_drift"] == 0.025
    assert metrics["audit_teacher_forced_seconds"] == 10.0
    assert "audit_generalisation_exact_match" not in metrics  # None is left out
    assert all(isinstance(v, float) for v in metrics.values())
    report = _report(result)
    assert report.retention == result.retention and not report.gate_passed
    assert report.timings == result.timings and report.metrics() == metrics


def test_a_report_can_carry_the_whole_audit_step_time() -> None:
    started = datetime(2026, 11, 23, 16, 0, 5, 123456, tzinfo=timezone(timedelta(hours=1)))
    report = _result().judged(
        decision=GateDecision(True),
        thresholds=GateThresholds(),
        trigger="requested",
        version="5",
        previous_good_version="5",
        action="promoted",
        started_at=started,
        seconds=40.5,
    )
    assert (report.started_at, report.seconds) == ("2026-11-23T15:00:05+00:00", 40.5)
    assert report.gate_passed
