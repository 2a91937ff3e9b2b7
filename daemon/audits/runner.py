"""One audit between batches: measure, gate, then promote the version or roll back to production.

The schedule (``daemon.audits.schedule``) only says an audit is due; the consumer loop calls
``AuditRunner.run`` between batches, so an audit never overlaps an edit. The run:

1. snapshots the current weights (the version being judged becomes ``candidate``);
2. audits retention of the live set (``Journal.live_events``: the newest applied correction of
   each fact; superseded ones are not audited), generalisation on their rephrases, locality on
   the probe set and perplexity drift (``monitoring.auditor``);
3. gates the figures against the floors and the last good audit (``monitoring.gates``);
4. pass: ``production`` moves to the version. Fail: the edits since ``production`` are sent to
   the quarantine topic with the audit figures, marked ``quarantined`` in the journal, and the
   model is rolled back to ``production`` (the base weights when no version passed yet); with
   ``audit.on_failure: warn`` a failure only warns (action ``warned``: edits and weights stay,
   ``production`` does not move). The quarantine records are checked for delivery first: if the
   broker did not take one, ``QuarantineDeliveryError`` is raised and nothing is marked or rolled
   back (a requested audit journals it as its ``failed:`` outcome; a scheduled one stops the
   daemon like an undelivered DLQ record, and the restart audits again);
5. records the figures as MLflow metrics on the version, as a JSON report, and as metrics.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaProducer
from kafka.errors import KafkaError

from daemon.config import Settings
from daemon.errors import QuarantineDeliveryError
from daemon.ingest.events import encode_event
from daemon.records.history import History
from daemon.records.journal import Journal, JournalEntry
from daemon.versions.keeper import VersionKeeper
from daemon.versions.snapshots import edited_tensors
from editing.evaluation import ModelState
from editing.models import LoadedModel
from editing.residual_store import ResidualStore
from monitoring.audit_report import AuditReport, read_audit_reports, write_audit_report
from monitoring.auditor import AuditFact, Auditor
from monitoring.baseline import Baseline
from monitoring.gates import GateDecision, evaluate_gate
from monitoring.metrics import FactkeeperMetrics
from monitoring.probes.load import load_probe_set, load_text_sample

log = logging.getLogger(__name__)

QUARANTINE_REASON = "audit-gate"


def audit_facts(entries: list[JournalEntry]) -> list[AuditFact]:
    """What the auditor checks of the live set's corrections (``Journal.live_events``)."""
    return [
        AuditFact(e.event_id, e.event.prompt, e.event.target_new, tuple(e.event.rephrases))
        for e in entries
    ]


def build_auditor(settings: Settings, lm: LoadedModel) -> Auditor:
    """The auditor for this model; call it while ``lm`` still holds the base weights."""
    a = settings.audit
    probes = load_probe_set(a.probe_set)
    text = load_text_sample(a.text_sample, probes)
    state = settings.journal.path.parent  # the daemon's state folder
    baseline = Baseline.load_or_compute(lm, probes, text, state / "audit-baselines")
    store = None
    if a.residual_cache_mib:
        store = ResidualStore(state / "residuals", lm.base_hash, a.residual_cache_mib << 20)
    return Auditor(lm, probes, baseline, sample_cap=a.sample_cap, text=text, residual_store=store)


class AuditRunner:
    """Runs audits and acts on the gate for one daemon."""

    def __init__(
        self,
        settings: Settings,
        auditor: Auditor,
        journal: Journal,
        versions: VersionKeeper | None,
        history: History | None,
        metrics: FactkeeperMetrics,
        reports_dir: Path,
    ) -> None:
        self.settings = settings
        self.auditor = auditor
        self.journal = journal
        self.versions = versions
        self.history = history
        self.metrics = metrics
        self.reports_dir = reports_dir
        self.thresholds = settings.audit.thresholds
        self.last_good = self._last_good_result()

    def _last_good_result(self) -> AuditReport | None:
        """The newest passing audit of the version ``production`` points to, if any."""
        production = self.versions.production() if self.versions else None
        for report in reversed(read_audit_reports(self.reports_dir)):
            if report.gate_passed and report.version == production:
                return report
        return None

    def last_started_at(self) -> datetime | None:
        """When the newest audit on record started (None: no audit ever ran)."""
        reports = read_audit_reports(self.reports_dir)
        return datetime.fromisoformat(reports[-1].started_at) if reports else None

    def run(self, trigger: str, producer: KafkaProducer | None) -> AuditReport:
        """Audit the current weights and act on the gate; returns the written report."""
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        version = None
        if self.versions is not None:
            self.versions.snapshot(f"audit ({trigger})")
            version = self.versions.current_version
        applied = self.journal.applied_events()  # every edit the weights hold, for quarantine
        live = audit_facts(self.journal.live_events())
        result = self.auditor.run(live, resume_layer=self.resume_layer())
        decision = evaluate_gate(result, self.thresholds, self.last_good)
        production = self.versions.production() if self.versions else None
        action, rolled_back_to, quarantined = "none", None, ()
        if decision.passed:
            if self.versions is not None and version is not None:
                self.versions.promote(version)
                action = "promoted"
            self.last_good = result
        elif self.settings.audit.on_failure == "warn":
            action = "warned"
            log.warning(
                "audit gate failed; audit.on_failure is warn, so the edits stay applied",
                extra={"version": version, "reasons": list(decision.reasons)},
            )
        elif self.history is not None and self.versions is not None:
            quarantined = self._quarantine(applied, production, result, decision, producer)
            if production is not None:
                self.history.rollback(production, QUARANTINE_REASON)
            else:
                self._back_to_base()
            action, rolled_back_to = "rolled_back", production
        seconds = time.perf_counter() - started
        report = result.judged(
            version=version,
            previous_good_version=production,
            started_at=started_at,
            seconds=seconds,
            trigger=trigger,
            decision=decision,
            thresholds=self.thresholds,
            action=action,
            rolled_back_to=rolled_back_to,
            quarantined_event_ids=list(quarantined),
        )
        path = write_audit_report(self.reports_dir, report)
        self._record(version, result, decision, seconds)
        log.info(
            "audit finished",
            extra={
                "trigger": trigger,
                "version": version,
                "passed": decision.passed,
                "action": action,
                "quarantined": len(quarantined),
                "seconds": round(seconds, 2),
                "report": str(path),
                **{k: round(v, 4) for k, v in result.metrics().items()},
            },
        )
        return report

    def resume_layer(self) -> int:
        """Blocks below the lowest edited one hold base weights: the auditor reuses their output."""
        if self.versions is None:
            return 0
        lm = self.versions.lm
        touched = set(edited_tensors(lm.model, self.versions.base, self.versions.names))
        return ModelState.from_touched(lm.adapter, touched).resume_layer

    def _quarantine(
        self,
        applied: list[JournalEntry],
        production: str | None,
        result: AuditReport,
        decision: GateDecision,
        producer: KafkaProducer | None,
    ) -> tuple[str, ...]:
        """Send the edits ``production`` does not hold to the quarantine topic, then journal."""
        kept = set()
        if production is not None and self.versions is not None:
            _, meta = self.versions.read(production)
            kept = set(meta.event_ids)
        offenders = [e for e in applied if e.event_id not in kept]
        figures = json.dumps(
            {"reasons": list(decision.reasons), **result.metrics()}, sort_keys=True
        ).encode()
        if producer is not None and offenders:
            topic = self.settings.kafka.topics.quarantine
            sent = []
            for entry in offenders:
                headers = [
                    ("factkeeper.reason", QUARANTINE_REASON.encode()),
                    ("factkeeper.audit", figures),
                    ("factkeeper.production_version", (production or "base").encode()),
                    ("factkeeper.journal_seq", str(entry.seq).encode()),
                ]
                future = producer.send(
                    topic,
                    value=encode_event(entry.event),
                    key=entry.event_id.encode(),
                    headers=headers,
                )
                sent.append((entry.event_id, future))
            # Like the DLQ: a record the broker did not take fails the audit here, before the
            # journal marks anything quarantined and before the rollback. kafka-python's flush
            # itself raises when the idempotent producer aborted its batches (e.g. a record
            # over the topic's max.message.bytes); the records it left unsent failed too.
            flush_error: KafkaError | None = None
            try:
                producer.flush()
            except KafkaError as exc:
                flush_error = exc
            failures: list[tuple[str, BaseException]] = []
            for event_id, future in sent:
                try:
                    future.get(timeout=0)
                except KafkaError as exc:
                    failures.append((event_id, exc if future.is_done else flush_error or exc))
            if failures:
                raise QuarantineDeliveryError(topic, failures)
        ids = tuple(e.event_id for e in offenders)
        if ids:
            reason = f"{QUARANTINE_REASON}: " + "; ".join(decision.reasons)
            self.journal.mark(ids, "quarantined", reason[:500])
            self.metrics.events.labels(result="quarantined").inc(len(ids))
        return ids

    def _back_to_base(self) -> None:
        """No version passed yet: every applied edit is quarantined, the base weights return."""
        assert self.versions is not None
        self.versions.load(None)
        self.versions.mark_synced()
        self.metrics.rollbacks.labels(reason=QUARANTINE_REASON).inc()
        self.metrics.edits_applied.set(0)

    def _record(
        self, version: str | None, result: AuditReport, decision: GateDecision, seconds: float
    ) -> None:
        m = self.metrics
        m.audit_duration.observe(seconds)
        m.audit_last_success.set(time.time())  # completed, pass or fail (the metric's meaning)
        if result.retention.exact_match is not None:
            m.retention.set(result.retention.exact_match)
        m.locality.set(result.locality.agreement)
        if result.generalisation.exact_match is not None:
            m.generalization.set(result.generalisation.exact_match)
        if version is not None and self.versions is not None:
            self.versions.registry.log_metrics(version, result.metrics())
            self.versions.registry.tag(version, "audit_passed", str(decision.passed).lower())
