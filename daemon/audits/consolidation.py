"""Consolidation: rebuild the edited weights from the base and the live set in one joint solve.

Sequential editing degrades because every batch is solved alone on top of the drift of all
earlier ones. The journal knows every live correction, so the daemon can do what a
log-structured store does with compaction: take edits online one batch at a time, and now and
then rebuild the edited weights **from the base weights and the whole live set at once**
(``Editor.consolidate``). One run, between batches in the loop thread (no edit overlaps it;
events wait in Kafka meanwhile):

1. audit the current weights: the figures the rebuild must match, on the same live set, probes
   and text (the audit runner's auditor);
2. set the editable weights to the base and consolidate the live set;
3. register the result as a version tagged ``consolidation: pending``, ``consolidated_from``
   (the version the weights came from), ``live_set_sha256`` and ``live_set_size``;
4. audit it and gate it (floors, and the last good audit as for any version);
5. **accept** it when retention and locality are at least the current weights' (less
   ``consolidation.tolerance``): the tag becomes ``accepted``, so a restart restores it and
   replays only the journal after it, and ``production`` moves to it when its gate passed too.
   Otherwise **reject** it: the weights and the editor's memory return to what they were
   (bit-exact), the tag becomes ``rejected``, and no restart restores it.

A crash between 3 and 5 leaves a ``pending`` version, which restore skips like a rejected one:
the restart rebuilds the weights the journal describes from the version before. Both audits
are written as audit reports (trigger ``consolidation``; action ``promoted``, ``none`` or
``discarded``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from daemon.audits.runner import AuditRunner, audit_facts
from daemon.config import ConsolidationSettings
from daemon.errors import ConsolidationError
from daemon.ingest.applier import to_request
from daemon.records.edit_material import MaterialStore
from daemon.records.journal import Journal, JournalEntry
from daemon.versions.keeper import CONSOLIDATION_TAG, VersionKeeper
from daemon.versions.snapshots import edited_tensors, load_into
from editing.editors.base import EditError, Editor
from editing.requests import EditRequest
from monitoring.audit_report import AuditReport, write_audit_report
from monitoring.gates import GateDecision, evaluate_gate
from monitoring.metrics import FactkeeperMetrics

log = logging.getLogger(__name__)

TRIGGER = "consolidation"


@dataclass(frozen=True)
class ConsolidationReport:
    """What one consolidation did; ``outcome`` is ``accepted``, ``rejected`` or ``skipped``."""

    outcome: str
    live_set_size: int
    version: str | None = None
    consolidated_from: str | None = None
    promoted: bool = False
    before: dict[str, float | None] | None = None  # retention, locality of the current weights
    after: dict[str, float | None] | None = None  # ... of the consolidated weights
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0

    def line(self) -> str:
        """The control command's outcome line."""
        if self.outcome == "skipped":
            return f"done: nothing consolidated ({'; '.join(self.reasons)})"
        figures = f"retention/locality {_pair(self.before)} -> {_pair(self.after)}"
        head = f"done: {self.outcome} version {self.version} of {self.live_set_size} live edits"
        tail = "; production moved" if self.promoted else ""
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return f"{head}; {figures}{tail}{why}; {self.seconds:.1f} s"


def live_set_sha256(entries: list[JournalEntry]) -> str:
    """sha256 of the live set's event ids in journal order: names the set a version holds."""
    return hashlib.sha256("\n".join(e.event_id or "" for e in entries).encode()).hexdigest()


def figures(report: AuditReport) -> dict[str, float | None]:
    return {"retention": report.retention.exact_match, "locality": report.locality.agreement}


class Consolidator:
    """Runs consolidations for one daemon (its editor, journal, versions and audits)."""

    def __init__(
        self,
        settings: ConsolidationSettings,
        editor: Editor,
        journal: Journal,
        versions: VersionKeeper,
        audits: AuditRunner,
        metrics: FactkeeperMetrics,
        material: MaterialStore | None = None,
    ) -> None:
        self.settings = settings
        self.editor = editor
        self.journal = journal
        self.versions = versions
        self.audits = audits
        self.metrics = metrics
        self.material = material
        self.last_run = time.monotonic()

    def due(self, applied_since: int) -> bool:
        """By count of applied edits since the last consolidation, or by time with edits."""
        s = self.settings
        by_count = s.every_n_edits > 0 and applied_since >= s.every_n_edits
        minutes = (time.monotonic() - self.last_run) / 60
        by_time = s.every_minutes > 0 and applied_since > 0 and minutes >= s.every_minutes
        return by_count or by_time

    def run(self) -> ConsolidationReport:
        """Consolidate the live set now; the weights change only if the result is accepted."""
        started = time.perf_counter()
        self.last_run = time.monotonic()
        live = self.journal.live_events()
        if not live:
            return ConsolidationReport("skipped", 0, reasons=("no live edits",))
        if not self.editor.supports_consolidation:
            return ConsolidationReport(
                "skipped", len(live), reasons=(f"{self.editor.name} has no joint solve",)
            )
        lm, keeper = self.versions.lm, self.versions
        requests = [to_request(e.event) for e in live]
        reused = self._take_material(live, requests)
        source = keeper.snapshot("before consolidation") or keeper.current_version
        facts = audit_facts(live)
        before = self.audits.auditor.run(facts, resume_layer=self.audits.resume_layer())
        saved = edited_tensors(lm.model, keeper.base, keeper.names)

        load_into(lm.model, keeper.base, {}, reset=keeper.names)
        try:
            result = self.editor.consolidate(lm, requests)
        except BaseException as exc:  # a failed solve never half-applies (its memory neither)
            load_into(lm.model, keeper.base, saved, reset=keeper.names)
            self.metrics.consolidations.labels(outcome="failed").inc()
            if isinstance(exc, EditError):
                raise ConsolidationError(f"the joint solve failed: {exc}") from exc
            raise
        version = self._register("consolidation", "pending", live, source)
        after = self.audits.auditor.run(facts, resume_layer=self.audits.resume_layer())
        decision = evaluate_gate(after, self.audits.thresholds, self.audits.last_good)
        worse = self._worse(before, after)
        accepted = not worse
        promoted = accepted and decision.passed
        keeper.registry.tag(version, CONSOLIDATION_TAG, "accepted" if accepted else "rejected")
        if promoted:
            keeper.promote(version)
            self.audits.last_good = after
        if not accepted:
            self.editor.undo(lm, result)  # the editor's memory as it was
            load_into(lm.model, keeper.base, saved, reset=keeper.names)
            keeper.current_version = source
            keeper.mark_synced()
        seconds = time.perf_counter() - started
        self._write(before, after, source, version, decision, accepted, promoted, started)
        outcome = "accepted" if accepted else "rejected"
        self.metrics.consolidations.labels(outcome=outcome).inc()
        self.metrics.consolidation_duration.observe(seconds)
        report = ConsolidationReport(
            outcome,
            len(live),
            version=version,
            consolidated_from=source,
            promoted=promoted,
            before=figures(before),
            after=figures(after),
            reasons=tuple(worse) + (decision.reasons if accepted else ()),
            seconds=seconds,
        )
        log.info(
            "consolidation finished",
            extra={
                "outcome": outcome,
                "version": version,
                "from": source,
                "live": len(live),
                "material_reused": reused,
                "promoted": promoted,
                "before": report.before,
                "after": report.after,
                "seconds": round(seconds, 1),
            },
        )
        return report

    def rebuild(self, reason: str) -> str:
        """The live set re-solved from the base weights and registered as an accepted version,
        unjudged: for a removal (``consolidation.on_removal``), where the weights it replaces
        still hold the removed edit and cannot be what it is compared with.

        Raises:
            ConsolidationError: the joint solve failed; the weights are the base weights then
                (the caller restores what it had).
        """
        lm, keeper = self.versions.lm, self.versions
        live = self.journal.live_events()
        requests = [to_request(e.event) for e in live]
        self._take_material(live, requests)
        source = keeper.current_version
        load_into(lm.model, keeper.base, {}, reset=keeper.names)
        if requests:
            try:
                self.editor.consolidate(lm, requests)
            except EditError as exc:
                raise ConsolidationError(f"the joint solve failed: {exc}") from exc
        else:
            self.editor.reset_memory(lm, [])
        version = self._register(reason, "accepted", live, source)
        self.last_run = time.monotonic()
        return version

    def _register(
        self, reason: str, verdict: str, live: list[JournalEntry], source: str | None
    ) -> str:
        """The rebuilt weights as a version with their lineage: what they replaced and which
        live set they hold."""
        version = self.versions.snapshot(
            reason,
            force=True,
            tags={
                CONSOLIDATION_TAG: verdict,
                "consolidated_from": source or "",
                "live_set_sha256": live_set_sha256(live),
                "live_set_size": str(len(live)),
            },
        )
        assert version is not None  # forced: a version is always registered
        return version

    def _take_material(self, live: list[JournalEntry], requests: list[EditRequest]) -> int:
        """Hand the editor each live event's stored material; returns how many it took (the
        rest it recomputes, e.g. after a change of its settings)."""
        if self.material is None:
            return 0
        lm, taken = self.versions.lm, 0
        for entry, request in zip(live, requests, strict=True):
            if entry.material_sha256 and entry.event_id:
                material = self.material.read(entry.event_id, entry.material_sha256)
                taken += bool(material and self.editor.take_material(lm, request, material))
        return taken

    def _worse(self, before: AuditReport, after: AuditReport) -> list[str]:
        """Sentences for each figure the consolidated weights lost beyond the tolerance."""
        reasons = []
        for name, old in figures(before).items():
            new = figures(after)[name]
            if old is not None and new is not None and new < old - self.settings.tolerance:
                reasons.append(f"{name} {new:.3f} is below the current weights' {old:.3f}")
        return reasons

    def _write(
        self,
        before: AuditReport,
        after: AuditReport,
        source: str | None,
        version: str,
        decision: GateDecision,
        accepted: bool,
        promoted: bool,
        started: float,
    ) -> None:
        """Both audits as reports: the current weights', then the consolidated version's."""
        a = self.audits
        production = self.versions.production()
        now = datetime.now(UTC)

        def write(report: AuditReport, gate: GateDecision, of: str | None, **extra: Any) -> None:
            judged = report.judged(
                decision=gate,
                thresholds=a.thresholds,
                trigger=TRIGGER,
                version=of,
                previous_good_version=production,
                **extra,
            )
            write_audit_report(a.reports_dir, judged)

        write(before, evaluate_gate(before, a.thresholds, a.last_good), source)
        action = "promoted" if promoted else ("none" if accepted else "discarded")
        elapsed = time.perf_counter() - started
        write(after, decision, version, action=action, started_at=now, seconds=elapsed)
        self.versions.registry.log_metrics(version, after.metrics())
        self.versions.registry.tag(version, "audit_passed", str(decision.passed).lower())


def _pair(values: dict[str, float | None] | None) -> str:
    if not values:
        return "-"
    return "/".join("-" if v is None else f"{v:.3f}" for v in values.values())
