"""The daemon process: load the model, rebuild its edits, consume, snapshot, serve metrics.

Start-up is the recipe of the design's "exactly-once effect": the model is the newest usable
snapshot (an MLflow version) plus a deterministic replay of the applied journal entries after
it, unit by unit in journal order; only then does the consumer resume from the committed
offsets. Replay re-runs the editor instead of loading stored deltas, so it needs editing to be
deterministic on CPU (the editors' tests check that).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from types import FrameType
from typing import TYPE_CHECKING

import torch

from daemon.admin import AdminServer, ControlInbox
from daemon.applier import BatchOutcome, EditApplier, TransientRetry, to_request
from daemon.config import Settings
from daemon.consumer import ControlHandler, FactConsumer, RunStats
from daemon.control import ControlCommand, Revert, Rollback, RunAudit, TakeSnapshot
from daemon.errors import HistoryError, JournalMismatchError
from daemon.history import History
from daemon.journal import Journal, JournalEntry
from daemon.kafka_clients import build_consumer, build_producer
from daemon.snapshots import load_into
from daemon.versions import VersionKeeper, base_weights, editable_weight_names
from editing.editors import Editor, get_editor
from editing.keystats import DEFAULT_CORPUS, KeyStatistics
from editing.models import LoadedModel, load_model
from editing.paths import Paths
from editing.safeguards import GuardedEditor, SafeguardConfig
from monitoring.http import MetricsServer, Readiness
from monitoring.metrics import FactkeeperMetrics

if TYPE_CHECKING:  # audits import the audit library lazily: only a daemon that audits needs it
    from daemon.audit_schedule import AuditSchedule
    from daemon.auditing import AuditRunner

log = logging.getLogger(__name__)

# broker_connected: set by the consumer from the Kafka client's open connections (issue 9).
READINESS_CONDITIONS = ("model_loaded", "partitions_assigned", "broker_connected")


@dataclass(frozen=True)
class ReplayReport:
    units: int
    events: int
    seconds: float


def snapshots_enabled(settings: Settings) -> bool:
    """Versioning is off when no trigger is set (every_n_edits, every_minutes, on_shutdown)."""
    s = settings.snapshots
    return s.every_n_edits > 0 or s.every_minutes > 0 or s.on_shutdown


def audits_enabled(settings: Settings) -> bool:
    """Audits are off when neither trigger is set (``audit.every_n_edits``, ``every_minutes``)."""
    return settings.audit.every_n_edits > 0 or settings.audit.every_minutes > 0


def replay_units(entries: list[JournalEntry]) -> Iterator[tuple[str, list[JournalEntry]]]:
    """Applied entries grouped into the units they were applied in, in journal order."""
    for batch_id, group in groupby(entries, key=lambda e: e.batch_id or f"seq-{e.seq}"):
        yield batch_id, list(group)


def build_editor(settings: Settings) -> Editor:
    """The configured editor, wrapped with the safeguards when they apply to its method."""
    editor = get_editor(settings.editor.method, **settings.editor.options)
    if settings.safeguards.wraps(settings.editor.method):
        editor = GuardedEditor(editor, SafeguardConfig(**settings.safeguards.to_config()))
    return editor


def key_statistics(settings: Settings, paths: Paths) -> KeyStatistics:
    """C0 for the safeguards: the configured corpus, cached under this daemon's home."""
    corpus = settings.safeguards.corpus or DEFAULT_CORPUS
    return KeyStatistics(paths, corpus=corpus, max_tokens=settings.safeguards.stats_tokens)


def replay_journal(applier: EditApplier, journal: Journal, after_seq: int = 0) -> ReplayReport:
    """Re-apply every applied journal entry after ``after_seq`` to the model in ``applier``."""
    started = time.perf_counter()
    entries = journal.applied_events(after_seq)
    units = 0
    for batch_id, group in replay_units(entries):
        applier.replay(batch_id, [e.event for e in group])
        units += 1
    report = ReplayReport(units, len(entries), time.perf_counter() - started)
    log.info(
        "journal replayed",
        extra={"units": units, "events": len(entries), "seconds": round(report.seconds, 2)},
    )
    return report


class Daemon:
    """One model, one editor, one journal, one consumer group member."""

    def __init__(
        self,
        settings: Settings,
        *,
        lm: LoadedModel | None = None,
        editor: Editor | None = None,
        metrics: FactkeeperMetrics | None = None,
        serve_metrics: bool = True,
        paths: Paths | None = None,
        start_version: str | None = None,
        accept_journal_mismatch: bool = False,
    ) -> None:
        self.settings = settings
        self.accept_journal_mismatch = accept_journal_mismatch
        self.paths = paths or Paths.from_env()
        self.metrics = metrics or FactkeeperMetrics()
        self.readiness = Readiness(*READINESS_CONDITIONS)
        self._server: MetricsServer | None = None
        if serve_metrics:
            m = settings.metrics
            self._server = MetricsServer(self.metrics.registry, self.readiness, m.host, m.port)
            self._server.start()
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.lm = lm or load_model(
            settings.model.name,
            paths=self.paths,
            device=settings.model.device,
            dtype=getattr(torch, settings.model.dtype),
        )
        self.editor = editor or build_editor(settings)
        self.applier = EditApplier(
            self.lm,
            self.editor,
            rebuild=self._rebuild_from_journal,
            retry=TransientRetry.from_settings(settings.editor),
        )
        settings.journal.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal = Journal.open(settings.journal.path)
        # The audit baseline needs the base weights: build it before any version is restored.
        auditor = None
        if audits_enabled(settings):
            from daemon.auditing import build_auditor

            auditor = build_auditor(settings, self.lm)
        self.versions = (
            VersionKeeper(settings, self.lm, self.journal, self.metrics)
            if (snapshots_enabled(settings))
            else None
        )
        # The unedited values, for rebuilding after an editor failure when versioning is off.
        self._base = self.versions.base if self.versions is not None else base_weights(self.lm)
        if isinstance(self.editor, GuardedEditor):
            self.editor.set_originals(self._base.get)
            if editor is None:  # an editor passed in brings its own statistics
                self.editor.set_statistics(key_statistics(settings, self.paths))
            if self.versions is not None:
                self.versions.on_load = self._editor_holds
        self.history = (
            History(
                self.versions,
                self.journal,
                self._replay_after,
                self.metrics,
                check=lambda events: self.applier.post_check([to_request(e) for e in events]),
            )
            if self.versions is not None
            else None
        )
        self._check_journal_against_registry()
        self.restored = self.versions.restore() if self.versions else None
        after_seq = self.restored.journal_seq if self.restored else 0
        self.replay = replay_journal(self.applier, self.journal, after_seq=after_seq)
        if start_version is not None:
            if self.history is None:
                raise HistoryError("starting from a version needs versioning (snapshots) on")
            self.history.rollback(start_version, "start")
        self.metrics.edits_applied.set(len(self.journal.applied_events()))
        version = self.versions.current_version if self.versions else None
        self.metrics.set_model_version(version or "base", self.lm.name)
        self.audits: AuditRunner | None = None
        self.schedule: AuditSchedule | None = None
        if auditor is not None:
            from daemon.audit_schedule import AuditSchedule
            from daemon.auditing import AuditRunner
            from daemon.operations import audit_reports_dir

            reports = audit_reports_dir(settings)
            self.audits = AuditRunner(
                settings, auditor, self.journal, self.versions, self.history, self.metrics, reports
            )
            self.schedule = AuditSchedule.from_settings(settings.audit)
        self.inbox: ControlInbox | None = None
        self._admin: AdminServer | None = None
        if settings.admin.enabled:
            self.inbox = ControlInbox()
            self._admin = AdminServer.from_settings(settings.admin, self.inbox).start()
        self.readiness.set("model_loaded", True)
        self.consumer: FactConsumer | None = None
        self._applied_since_snapshot = self.replay.events

    def _check_journal_against_registry(self) -> None:
        """An empty journal beside registered versions of this model means a lost journal."""
        if self.versions is None or self.accept_journal_mismatch or not self.journal.is_empty():
            return
        mine = [
            v.version
            for v in self.versions.registry.versions()
            if v.tags.get("base_hash") == self.lm.base_hash
        ]
        if mine:
            raise JournalMismatchError(
                f"the journal at {self.journal.path} is empty, but "
                f"{self.settings.snapshots.registered_model_name!r} has {len(mine)} registered "
                f"version(s) of this model (newest {mine[0]}): the daemon would silently start "
                "from the base weights"
            )

    def _rebuild_from_journal(self) -> None:
        """Weights of unknown state (an editor failed mid-write) -> newest version + replay."""
        started = time.perf_counter()
        after_seq = 0
        if self.versions is not None:
            restored = self.versions.restore()
            if restored.version is None:
                self.versions.load(None)
            after_seq = restored.journal_seq
        else:
            load_into(self.lm.model, self._base, {}, reset=editable_weight_names(self.lm))
            self._editor_holds(())
        report = replay_journal(self.applier, self.journal, after_seq=after_seq)
        seconds = time.perf_counter() - started
        log.warning(
            "weights rebuilt", extra={"replayed": report.events, "seconds": round(seconds, 2)}
        )

    def _editor_holds(self, event_ids: Sequence[str]) -> None:
        """The weights were just set to hold exactly ``event_ids``: the safeguards' memory of
        earlier edits' keys must say the same before anything is replayed on top."""
        if not isinstance(self.editor, GuardedEditor):
            return
        entries = (self.journal.get(i) for i in event_ids)
        held = [to_request(e.event) for e in entries if e is not None and e.event is not None]
        self.editor.reset_memory(self.lm, held)

    def _replay_after(self, seq: int) -> int:
        return replay_journal(self.applier, self.journal, after_seq=seq).events

    def run(
        self,
        *,
        max_messages: int | None = None,
        idle_timeout_s: float | None = None,
        on_control: ControlHandler | None = None,
        handle_signals: bool = True,
    ) -> RunStats:
        """Consume until SIGTERM/SIGINT (or the test limits); always closes the clients."""
        consumer = FactConsumer(
            self.settings,
            self.applier,
            self.journal,
            build_consumer(self.settings.kafka),
            build_producer(self.settings.kafka),
            self.metrics,
            self.readiness,
            on_control=on_control or self.handle_control,
            after_batch=self._after_batch,
            between_batches=self._between_batches,
            accept_journal_mismatch=self.accept_journal_mismatch,
        )
        self.consumer = consumer
        previous = self._install_signals(consumer) if handle_signals else {}
        if self.schedule is not None:
            self.schedule.start()
        try:
            stats = consumer.run(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
            if self.versions is not None and self.settings.snapshots.on_shutdown:
                self.versions.snapshot("shutdown")
            return stats
        finally:
            if self.schedule is not None:
                self.schedule.shutdown()
            consumer.close()
            self.readiness.set("partitions_assigned", False)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _after_batch(self, outcome: BatchOutcome) -> None:
        applied = len(outcome.applied_ids)
        self.metrics.edits_applied.inc(applied)
        self._applied_since_snapshot += applied
        if self.schedule is not None:
            self.schedule.note_applied(applied)
        if self.versions is not None and self.versions.due(self._applied_since_snapshot):
            self.versions.snapshot("schedule")
            self._applied_since_snapshot = 0

    def _between_batches(self) -> None:
        """Work that must not overlap an edit (admin commands, a due audit): loop thread only."""
        if self.inbox is not None and self.consumer is not None:
            for item in self.inbox.drain():
                outcome = self.consumer.execute_control(
                    item.command, source=item.source, received_at=item.received_at
                )
                self.inbox.complete(item.id, outcome)
        if self.schedule is not None:
            trigger = self.schedule.take()
            if trigger is not None:
                self.run_audit(trigger)

    def run_audit(self, trigger: str) -> str:
        """Audit now (between batches) and act on the gate; returns the outcome line."""
        if self.audits is None:
            return "unsupported: audits are off (audit.every_n_edits and every_minutes are 0)"
        producer = self.consumer.producer if self.consumer is not None else None
        report = self.audits.run(trigger, producer)
        self._applied_since_snapshot = 0
        verdict = "passed" if report.gate_passed else "failed: " + "; ".join(report.gate.reasons)
        return f"done: audit of version {report.version} {verdict}; action {report.action}"

    def handle_control(self, command: ControlCommand) -> str:
        """Execute ``audit``, ``snapshot``, ``rollback`` and ``revert``; returns the outcome."""
        if isinstance(command, RunAudit):
            return self.run_audit("requested")
        if self.versions is None or self.history is None:
            return f"unsupported: {command.command} needs versioning (snapshots) on"
        try:
            if isinstance(command, TakeSnapshot):
                version = self.versions.snapshot("requested")
                self._applied_since_snapshot = 0
                current = self.versions.current_version
                return f"done: version {version}" if version else f"done: unchanged ({current})"
            if isinstance(command, Rollback):
                report = self.history.rollback(str(command.version), "manual", force=command.force)
                kept = f", {len(report.kept_out)} removed edits kept out" if report.kept_out else ""
                return (
                    f"done: version {report.version}; {len(report.rolled_back)} edits rolled "
                    f"back, {len(report.restored)} restored{kept}"
                )
            if isinstance(command, Revert):
                rev = self.history.revert(command.event_id)
                siblings = ""
                if rev.resplit:
                    siblings = (
                        f"; {len(rev.resplit)} batch siblings re-applied alone, "
                        f"{len(rev.failed)} failed: {', '.join(rev.failed) or 'none'}"
                    )
                return (
                    f"done: version {rev.new_version}; replayed {rev.replayed} edits from "
                    f"{rev.rebuilt_from or 'base'} in {rev.seconds:.1f} s{siblings}"
                )
        except HistoryError as exc:
            return f"refused: {exc}"
        return f"unsupported: {command.command}"

    def close(self) -> None:
        if self._admin is not None:
            self._admin.stop()
        self.journal.close()
        if self._server is not None:
            self._server.stop()

    def _install_signals(self, consumer: FactConsumer) -> dict[int, object]:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
            consumer.stop_requested.set()

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
        return previous
