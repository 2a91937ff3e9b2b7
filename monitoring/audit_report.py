"""The audit report: one audit's figures, the gate's verdict, and its ``factkeeper-audit/v1`` file.

``Auditor.run`` returns an unjudged report; ``AuditReport.judged`` adds the gate's decision and
what the daemon did, and only then is it written: one JSON file per audit, named by its start
time, which a restarted daemon reads back for its last good audit and ``factkeeper report``
renders. Reading is strict about the shape, so a damaged file is named instead of misread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast, get_args

from monitoring.errors import AuditReportError
from monitoring.files import write_atomic
from monitoring.gates import GateDecision, GateThresholds
from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    PerplexityFigures,
    RetentionFigures,
)

REPORT_SCHEMA = "factkeeper-audit/v1"

Trigger = Literal["edits", "timer", "requested", "shutdown", "consolidation"]
Action = Literal["promoted", "rolled_back", "warned", "discarded", "none"]
"""``discarded``: a consolidation's version lost to the weights it would replace."""
TRIGGERS: tuple[str, ...] = get_args(Trigger)
ACTIONS: tuple[str, ...] = get_args(Action)


@dataclass(frozen=True)
class AuditReport:
    """One audit: what it measured and, once judged, the gate's decision and what was done.

    ``Auditor.run`` fills in the figures; ``judged`` adds the verdict, and only a judged report
    is written (schema ``factkeeper-audit/v1``). The file keeps neither ``timings`` nor
    ``failing_total``: a report read back has no timings, and its failing count is the number of
    ids it lists.
    """

    started_at: str  # ISO-8601, UTC
    seconds: float
    edits_total: int
    edits_audited: int
    sampled: bool
    retention: RetentionFigures
    generalisation: GeneralisationFigures
    locality: LocalityFigures
    perplexity: PerplexityFigures
    failing_event_ids: tuple[str, ...]
    """Audited facts that no longer hold, oldest first, at most ``auditor.FAILING_IDS_CAP``."""
    failing_total: int
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    """Wall seconds per phase (``teacher_forced_seconds``, ``generation_seconds``), the audit's
    ``cpu_seconds``, and how many pairs were scored and prompts decoded. Not compared: how long
    the audit took is not what it found, and the report file does not keep them."""
    trigger: Trigger | None = None
    """What started the audit; None until judged, like ``gate`` and ``thresholds``."""
    version: str | None = None
    previous_good_version: str | None = None
    gate: GateDecision | None = None
    thresholds: GateThresholds | None = None
    action: Action = "none"
    rolled_back_to: str | None = None
    quarantined_event_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trigger is not None and self.trigger not in TRIGGERS:
            raise AuditReportError(f"trigger {self.trigger!r} is not one of {', '.join(TRIGGERS)}")
        if self.action not in ACTIONS:
            raise AuditReportError(f"action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if len({self.trigger is None, self.gate is None, self.thresholds is None}) > 1:
            raise AuditReportError("a judged audit report needs its trigger, gate and thresholds")

    def judged(
        self,
        *,
        decision: GateDecision,
        thresholds: GateThresholds,
        trigger: Trigger,
        version: str | None,
        previous_good_version: str | None,
        action: Action = "none",
        rolled_back_to: str | None = None,
        quarantined_event_ids: Sequence[str] = (),
        started_at: datetime | None = None,
        seconds: float | None = None,
    ) -> AuditReport:
        """This audit with the gate's decision and what the daemon did about it.

        Args:
            started_at, seconds: of the whole audit step (snapshot, audit, promotion or
                rollback); default: the measurement's own.
        """
        return replace(
            self,
            version=version,
            previous_good_version=previous_good_version,
            started_at=(
                started_at.astimezone(UTC).isoformat(timespec="seconds")
                if started_at is not None
                else self.started_at
            ),
            seconds=seconds if seconds is not None else self.seconds,
            trigger=trigger,
            gate=decision,
            thresholds=thresholds,
            action=action,
            rolled_back_to=rolled_back_to,
            quarantined_event_ids=tuple(quarantined_event_ids),
        )

    @property
    def gate_passed(self) -> bool:
        """Whether the gate judged this audit and let it pass."""
        return self.gate is not None and self.gate.passed

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow (``audit_retention_exact_match``, ...); None ones left out."""
        ci = self.retention.ci95
        values: dict[str, float | int | bool | None] = {
            "audit_edits_total": self.edits_total,
            "audit_edits_audited": self.edits_audited,
            "audit_sampled": self.sampled,
            "audit_retention_exact_match": self.retention.exact_match,
            "audit_retention_token_accuracy": self.retention.token_accuracy,
            "audit_retention_ci95_low": ci[0] if ci else None,
            "audit_retention_ci95_high": ci[1] if ci else None,
            "audit_retention_failing": self.failing_total,
            "audit_generalisation_exact_match": self.generalisation.exact_match,
            "audit_generalisation_n": self.generalisation.n,
            "audit_locality_agreement": self.locality.agreement,
            "audit_locality_gold_accuracy": self.locality.gold_accuracy,
            "audit_locality_n": self.locality.n,
            "audit_perplexity_base": self.perplexity.base,
            "audit_perplexity_current": self.perplexity.current,
            "audit_perplexity_drift": self.perplexity.drift,
            "audit_seconds": self.seconds,
        }
        values.update({f"audit_{name}": value for name, value in self.timings.items()})
        return {k: float(v) for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """The ``factkeeper-audit/v1`` object; only a judged report has one."""
        if self.gate is None or self.thresholds is None:
            raise AuditReportError("an audit report is written once the gate has judged it")
        ci = self.retention.ci95
        return {
            "schema": REPORT_SCHEMA,
            "version": self.version,
            "previous_good_version": self.previous_good_version,
            "started_at": self.started_at,
            "seconds": self.seconds,
            "trigger": self.trigger,
            "edits_total": self.edits_total,
            "edits_audited": self.edits_audited,
            "sampled": self.sampled,
            "retention": {
                "exact_match": self.retention.exact_match,
                "token_accuracy": self.retention.token_accuracy,
                "ci95": list(ci) if ci is not None else None,
            },
            "generalisation": asdict(self.generalisation),
            "locality": asdict(self.locality),
            "perplexity": asdict(self.perplexity),
            "gate": {
                "passed": self.gate.passed,
                "reasons": list(self.gate.reasons),
                "thresholds": self.thresholds.to_dict(),
            },
            "action": self.action,
            "rolled_back_to": self.rolled_back_to,
            "quarantined_event_ids": list(self.quarantined_event_ids),
            "failing_event_ids": list(self.failing_event_ids),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any) -> AuditReport:
        """Parse a report, checking every key of the shape (unknown or missing keys are errors)."""
        _expect_keys(data, _REPORT_KEYS, "report")
        if data["schema"] != REPORT_SCHEMA:
            raise AuditReportError(f"schema {data['schema']!r} is not {REPORT_SCHEMA!r}")
        for name, keys in _NESTED_KEYS.items():
            _expect_keys(data[name], keys, name)
        gate = data["gate"]
        _expect_keys(
            gate["thresholds"], set(GateThresholds.__dataclass_fields__), "gate.thresholds"
        )
        try:
            ci = data["retention"]["ci95"]
            return cls(
                version=_optional_str(data["version"]),
                previous_good_version=_optional_str(data["previous_good_version"]),
                started_at=str(data["started_at"]),
                seconds=float(data["seconds"]),
                trigger=cast(Trigger, data["trigger"]),
                edits_total=int(data["edits_total"]),
                edits_audited=int(data["edits_audited"]),
                sampled=bool(data["sampled"]),
                retention=RetentionFigures(
                    exact_match=_optional_float(data["retention"]["exact_match"]),
                    token_accuracy=_optional_float(data["retention"]["token_accuracy"]),
                    ci95=(float(ci[0]), float(ci[1])) if ci is not None else None,
                ),
                generalisation=GeneralisationFigures(
                    exact_match=_optional_float(data["generalisation"]["exact_match"]),
                    n=int(data["generalisation"]["n"]),
                ),
                locality=LocalityFigures(
                    agreement=float(data["locality"]["agreement"]),
                    gold_accuracy=float(data["locality"]["gold_accuracy"]),
                    n=int(data["locality"]["n"]),
                ),
                perplexity=PerplexityFigures(
                    **{k: float(v) for k, v in data["perplexity"].items()}
                ),
                gate=GateDecision(passed=bool(gate["passed"]), reasons=tuple(gate["reasons"])),
                thresholds=GateThresholds.from_dict(gate["thresholds"]),
                action=cast(Action, data["action"]),
                rolled_back_to=_optional_str(data["rolled_back_to"]),
                quarantined_event_ids=tuple(str(x) for x in data["quarantined_event_ids"]),
                failing_event_ids=tuple(str(x) for x in data["failing_event_ids"]),
                failing_total=len(data["failing_event_ids"]),
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise AuditReportError(f"malformed audit report: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> AuditReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AuditReportError(f"an audit report is not valid JSON: {exc}") from None
        return cls.from_dict(data)


_REPORT_KEYS = {
    "schema", "version", "previous_good_version", "started_at", "seconds", "trigger",
    "edits_total", "edits_audited", "sampled", "retention", "generalisation", "locality",
    "perplexity", "gate", "action", "rolled_back_to", "quarantined_event_ids",
    "failing_event_ids",
}  # fmt: skip
_NESTED_KEYS = {
    "retention": {"exact_match", "token_accuracy", "ci95"},
    "generalisation": {"exact_match", "n"},
    "locality": {"agreement", "gold_accuracy", "n"},
    "perplexity": {"base", "current", "drift"},
    "gate": {"passed", "reasons", "thresholds"},
}


def write_audit_report(folder: Path, report: AuditReport) -> Path:
    """Write ``audit-<UTC yyyymmddTHHMMSS>-v<version>.json`` atomically; returns its path.

    The time is the audit's start; a second report with the same name gets ``-1``, ``-2``, ...
    """
    stamp = datetime.fromisoformat(report.started_at).astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    stem = f"audit-{stamp}-v{report.version if report.version is not None else 'none'}"
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / f"{stem}.json", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    write_atomic(path, report.to_json() + "\n")
    return path


def read_audit_reports(folder: Path) -> list[AuditReport]:
    """Every report in ``folder``, oldest first; an absent folder has none.

    Raises:
        AuditReportError: a file is not a report; the message names it.
    """
    if not folder.is_dir():
        return []
    found: list[tuple[datetime, str, AuditReport]] = []
    for path in sorted(folder.glob("audit-*.json")):
        try:
            report = AuditReport.from_json(path.read_text(encoding="utf-8"))
        except AuditReportError as exc:
            raise AuditReportError(f"{path}: {exc}; move it aside to continue") from None
        when = datetime.fromisoformat(report.started_at).astimezone(UTC)
        found.append((when, path.name, report))
    found.sort(key=lambda item: (item[0], item[1]))
    return [report for _, _, report in found]


def _expect_keys(value: Any, keys: set[str], where: str) -> None:
    if not isinstance(value, dict):
        raise AuditReportError(f"{where}: expected an object")
    missing, unknown = keys - set(value), set(value) - keys
    if missing or unknown:
        raise AuditReportError(
            f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = [
    "ACTIONS",
    "REPORT_SCHEMA",
    "TRIGGERS",
    "Action",
    "AuditReport",
    "Trigger",
    "read_audit_reports",
    "write_audit_report",
]
