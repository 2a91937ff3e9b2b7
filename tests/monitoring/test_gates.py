"""The audit gate: floors, drops against the last passing audit, perplexity drift, reasons."""

from __future__ import annotations

from dataclasses import replace

import pytest

from daemon.config import AuditSettings
from monitoring.audit_report import AuditReport
from monitoring.gates import GateDecision, GateThresholds, evaluate_gate
from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    PerplexityFigures,
    RetentionFigures,
)


def _result(
    retention: float | None = 0.95,
    locality: float = 0.98,
    generalisation: float | None = 0.6,
    drift: float = 0.02,
) -> AuditReport:
    return AuditReport(
        started_at="2026-11-23T15:00:00+00:00",
        seconds=1.0,
        edits_total=200,
        edits_audited=200,
        sampled=False,
        retention=RetentionFigures(retention, retention, None),
        generalisation=GeneralisationFigures(generalisation, 40 if generalisation else 0),
        locality=LocalityFigures(locality, locality, 300),
        perplexity=PerplexityFigures(10.0, 10.0 * (1 + drift), drift),
        failing_event_ids=(),
        failing_total=0,
    )


THRESHOLDS = GateThresholds()


def test_a_healthy_audit_passes_with_no_reasons() -> None:
    assert evaluate_gate(_result(), THRESHOLDS, None) == GateDecision(True, ())
    assert evaluate_gate(_result(), THRESHOLDS, _result()).passed


def test_floors_are_absolute_and_reasons_carry_the_figures() -> None:
    decision = evaluate_gate(_result(retention=0.75, locality=0.85), THRESHOLDS, None)
    assert not decision.passed
    assert len(decision.reasons) == 2
    retention, locality = decision.reasons
    assert "retention 0.750 is below the floor 0.800" in retention
    assert "150 of 200 audited edits" in retention
    assert "locality 0.850 is below the floor 0.900" in locality
    assert "255 of 300 probes" in locality


def test_perplexity_drift_beyond_the_limit_fails() -> None:
    decision = evaluate_gate(_result(drift=0.25), THRESHOLDS, None)
    assert not decision.passed
    assert "+25.0%" in decision.reasons[0] and "10.000 -> 12.500" in decision.reasons[0]
    assert evaluate_gate(_result(drift=-0.3), THRESHOLDS, None).passed  # falling is fine


def test_drops_against_the_last_good_audit_fail_even_above_the_floors() -> None:
    previous = _result(retention=0.99, locality=0.99, generalisation=0.7)
    now = _result(retention=0.90, locality=0.97, generalisation=0.6)
    decision = evaluate_gate(now, THRESHOLDS, previous)
    assert not decision.passed
    assert [r.split(" ", 1)[0] for r in decision.reasons] == ["retention", "generalisation"]
    assert "fell by 0.090" in decision.reasons[0] and "0.990 -> 0.900" in decision.reasons[0]
    assert evaluate_gate(now, THRESHOLDS, None).passed  # no previous audit: no drop


def test_a_drop_of_exactly_max_drop_passes() -> None:
    previous = _result(retention=0.95, locality=0.95)
    assert evaluate_gate(_result(retention=0.90, locality=0.90), THRESHOLDS, previous).passed
    assert not evaluate_gate(_result(retention=0.899), THRESHOLDS, previous).passed


def test_figures_that_do_not_apply_are_not_judged() -> None:
    empty = _result(retention=None, generalisation=None)
    assert evaluate_gate(empty, THRESHOLDS, _result()).passed
    assert evaluate_gate(_result(), THRESHOLDS, empty).passed


def test_thresholds_are_validated_and_follow_the_settings() -> None:
    with pytest.raises(ValueError, match="retention_floor"):
        GateThresholds(retention_floor=1.2)
    with pytest.raises(ValueError, match="max_perplexity_drift"):
        GateThresholds(max_perplexity_drift=-0.1)
    settings = AuditSettings(retention_floor=0.7, max_perplexity_drift=0.2)
    thresholds = settings.thresholds
    assert thresholds == replace(THRESHOLDS, retention_floor=0.7, max_perplexity_drift=0.2)
    assert AuditSettings().thresholds == THRESHOLDS
    assert GateThresholds.from_dict(thresholds.to_dict()) == thresholds
