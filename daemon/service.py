"""The daemon process: load the model, rebuild its edits, consume, snapshot, serve metrics.

Start-up is the recipe of the design's "exactly-once effect": the model is the newest usable
snapshot (an MLflow version) plus a replay of the applied journal entries after it, unit by unit
in journal order; only then does the consumer resume from the committed offsets. Replay adds
each unit's stored deltas back (``daemon.records.unit_deltas``: written before the unit's journal
rows, checked against the journaled hash), so a restart costs reads, not edits; a unit without
usable ones is re-edited, which needs editing to be deterministic on CPU (the editors' tests check
that). A revert or a rollback that rebuilds re-edits on purpose and stores the new deltas.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import torch

from daemon.config import Settings
from daemon.control.admin import AdminServer, ControlInbox
from daemon.control.commands import (
    Consolidate,
    ControlCommand,
    Revert,
    Rollback,
    RunAudit,
    TakeSnapshot,
)
from daemon.errors import (
    ConsolidationError,
    HistoryError,
    JournalMismatchError,
    MissingUnitDeltasError,
    ReplayMismatchError,
    SettingsError,
    UnitDeltasError,
)
from daemon.ingest.applier import (
    BatchOutcome,
    EditApplier,
    Rung,
    TransientRetry,
    rung_spec,
    to_request,
)
from daemon.ingest.consumer import ControlHandler, FactConsumer, RunStats
from daemon.kafka.clients import build_consumer, build_producer, ensure_topics
from daemon.records.edit_material import MaterialStore
from daemon.records.history import History
from daemon.records.journal import Journal, JournalEntry
from daemon.records.unit_deltas import UnitDeltaStore, extend_lineage, lineage_of
from daemon.versions.keeper import (
    SnapshotBackoff,
    VersionKeeper,
    base_weights,
    editable_weight_names,
)
from daemon.versions.registry import RegistryUnavailableError
from daemon.versions.snapshots import load_into
from editing.editors.base import EditError, Editor, EditResult
from editing.keystats import DEFAULT_CORPUS, KeyStatistics
from editing.memory.module import memory_of
from editing.models import LoadedModel, load_model
from editing.paths import Paths
from editing.registry import get_editor
from editing.safeguards import GuardedEditor
from monitoring.http import Heartbeat, MetricsServer, Readiness
from monitoring.metrics import FactkeeperMetrics

if TYPE_CHECKING:  # audits import the audit library lazily: only a daemon that audits needs it
    from daemon.audits.consolidation import Consolidator
    from daemon.audits.runner import AuditRunner
    from daemon.audits.schedule import AuditSchedule

log = logging.getLogger(__name__)

#: Relative tolerance on delta norms when replaying an editor that is not bit-exact.
GUARDED_NORM_RTOL = 1e-4
#: How often the start-up key statistics pass logs its progress.
STATS_LOG_EVERY_S = 10.0

# broker_connected: set by the consumer from the Kafka client's open connections (issue 9).
# key_statistics: C0 for the safeguards, computed before ready so no edit waits for it.
READINESS_CONDITIONS = (
    "model_loaded",
    "key_statistics",
    "partitions_assigned",
    "broker_connected",
)


@dataclass(frozen=True)
class ReplayReport:
    units: int
    events: int
    seconds: float
    stored: int = 0
    """Units applied from their stored deltas; the rest were re-edited."""


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
        editor = GuardedEditor(editor, settings.safeguards.config)
    return editor


def build_ladder(settings: Settings, editor: Editor) -> list[Rung]:
    """The retry ladder's rungs (``editor.retry_ladder``), each with its own editor.

    An ``editor`` that keeps a memory of past edits (NSE) would miss the edits another editor
    applies, so its rungs are its own variants (``Editor.variant``: the same method with other
    options, sharing its memory).

    Raises:
        SettingsError: a rung's editor cannot be built, keeps a memory of its own (replay could
            not rebuild it per rung), or is not a variant of an ``editor`` that keeps one.
    """
    rungs = []
    for index, rung in enumerate(settings.editor.ladder(), start=1):
        method, options = settings.editor.rung_options(rung)
        where = f"editor.retry_ladder[{index - 1}]"
        try:
            if editor.keeps_edit_memory:
                rung_editor = editor.variant(method, **options)
            else:
                rung_editor = get_editor(method, **options)
        except (EditError, TypeError, ValueError) as exc:
            raise SettingsError([(where, f"{method}: {exc}")]) from exc
        if rung_editor is None:
            message = (
                f"{method}: the {editor.name} editor keeps a memory of past edits that a "
                f"{method} rung would miss; its rungs must be {editor.name} with other options "
                "(or set editor.retry_ladder: [])"
            )
            raise SettingsError([(where, message)])
        if not editor.keeps_edit_memory and (
            rung_editor.keeps_edit_memory or settings.safeguards.wraps(method)
        ):
            message = (
                f"{method}: an editor that keeps a memory of past edits (NSE, or one the "
                "safeguards wrap) cannot be a retry rung of one that keeps none"
            )
            raise SettingsError([(where, message)])
        shown = " ".join(f"{k}={v}" for k, v in sorted(rung.options.items()))
        label = f"rung {index} ({method}{' ' + shown if shown else ''})"
        rungs.append(Rung(index, rung_spec(method, options), rung_editor, label))
    return rungs


def editor_checkpoint(editor: Editor) -> Path | None:
    """The trained checkpoint folder an editor (or the one it guards) loaded, if any."""
    inner = editor.inner if isinstance(editor, GuardedEditor) else editor
    folder = getattr(inner, "checkpoint", None)
    return Path(folder) if folder is not None else None


def key_statistics(settings: Settings, paths: Paths) -> KeyStatistics:
    """C0 for the safeguards: the configured corpus, cached under this daemon's home."""
    corpus = settings.safeguards.corpus or DEFAULT_CORPUS
    return KeyStatistics(paths, corpus=corpus, max_tokens=settings.safeguards.config.stats_tokens)


def verify_replayed(editor: Editor, group: Sequence[JournalEntry], result: EditResult) -> None:
    """The replayed unit must change the weights exactly as the journal says it did.

    Bit-exact editors are held to the journaled sha256 of the delta bytes. The guarded editor
    is not bit-exact once its memory was rebuilt (``GuardedEditor.replay_bit_exact``), so for it
    every delta's norm must match the journaled norm within ``GUARDED_NORM_RTOL``; a different
    edit changes the norms by far more. Rows journaled before the hash existed are not checked.

    Raises:
        ReplayMismatchError: naming the events, both figures and what to check.
    """
    first = group[0]
    if first.delta_sha256 is None:
        return
    ids = ", ".join(e.event_id or "?" for e in group)
    if editor.replay_bit_exact:
        got = result.delta_sha256()
        if got != first.delta_sha256:
            raise ReplayMismatchError(
                f"replaying journal seq {first.seq} ({ids}) changed the weights differently "
                f"than when it was applied (delta sha256 {got[:16]} != journaled "
                f"{first.delta_sha256[:16]}): check torch/transformers versions, "
                "model.torch_threads and the editor checkpoint against the version's tags"
            )
        return
    expected = first.delta_norms or {}
    got_norms = result.delta_norms()

    def off(name: str) -> bool:
        if name not in expected or name not in got_norms:
            return True
        allowed = GUARDED_NORM_RTOL * max(abs(expected[name]), 1e-12)
        return abs(got_norms[name] - expected[name]) > allowed

    bad = sorted(name for name in set(expected) | set(got_norms) if off(name))
    if bad:
        raise ReplayMismatchError(
            f"replaying journal seq {first.seq} ({ids}) with {editor.name} changed {bad[0]} by "
            f"norm {got_norms.get(bad[0])} instead of the journaled {expected.get(bad[0])} "
            f"(beyond the {GUARDED_NORM_RTOL} tolerance for this editor)"
        )


def replay_journal(
    applier: EditApplier,
    journal: Journal,
    after_seq: int = 0,
    *,
    rehash: bool = False,
    store: UnitDeltaStore | None = None,
) -> ReplayReport:
    """Re-apply every applied journal entry after ``after_seq`` to the model in ``applier``.

    A unit whose stored deltas (``store``) hash to the journal's ``delta_sha256`` and were
    computed after exactly the units the journal now puts before it (their lineage) gets them
    added back without calling the editor: the weights it had, bit for bit, at the cost of a
    read. Any other unit is re-applied with the editor that applied it (the configured one, or
    the retry rung the journal names) and its weight change is checked against the journal
    (``verify_replayed``); a rung the ladder no longer has raises ``RetryLadderChangedError``
    either way. An editor that keeps a memory of past edits has it rebuilt for the units it did
    not apply (``rebuild_memory``). With ``rehash`` (a revert recomputes later edits on weights
    that never held the reverted one) every unit is re-edited, and its new hash and deltas are
    recorded instead.
    """
    started = time.perf_counter()
    entries = journal.applied_events(after_seq)
    lineage = lineage_of(journal.applied_lineage(after_seq))  # what the weights hold now
    units = stored = 0
    memory_behind = False  # the editor's memory lacks units applied from stored deltas
    for batch_id, group in replay_units(entries):
        if group[0].restores_original:  # no edit of its own (``daemon.ingest.restores``)
            lineage = extend_lineage(lineage, [(e.event_id, e.batch_id, None) for e in group])
            continue
        events = [e.event for e in group]
        deltas = None if rehash else _stored_deltas(store, batch_id, group, lineage)
        digest = group[0].delta_sha256
        if deltas is not None and _add_stored(applier, batch_id, group, deltas):
            memory_behind = memory_behind or applier.editor.keeps_edit_memory
            stored += 1
        else:
            if memory_behind:  # the editor is about to read its memory: bring it up to here
                rebuild_memory(applier, journal, before_seq=group[0].seq)
                memory_behind = False
            unit = applier.replay(batch_id, events, group[0].retry_rung)
            if not rehash:
                verify_replayed(applier.editor_of(unit), group, unit.result)
            elif group[0].batch_id is not None:
                digest = unit.result.delta_sha256()
                if store is not None:
                    store.try_write(batch_id, unit.result.deltas, lineage)
                journal.set_delta_sha256(group[0].batch_id, digest)
        lineage = extend_lineage(lineage, [(e.event_id, e.batch_id, digest) for e in group])
        units += 1
    if memory_behind:
        rebuild_memory(applier, journal)
    report = ReplayReport(units, len(entries), time.perf_counter() - started, stored)
    log.info(
        "journal replayed",
        extra={
            "units": units,
            "from_stored_deltas": stored,
            "re_edited": units - stored,
            "events": len(entries),
            "seconds": round(report.seconds, 2),
        },
    )
    return report


def _stored_deltas(
    store: UnitDeltaStore | None, batch_id: str, group: Sequence[JournalEntry], lineage: str
) -> dict[str, torch.Tensor] | None:
    """The unit's stored deltas if they are the ones the journal hashed, computed on weights of
    ``lineage``; else None (re-edit)."""
    digest = group[0].delta_sha256
    if store is None or group[0].batch_id is None or digest is None:
        return None  # rows journaled before hashes or batch ids: nothing to check deltas by
    if any(e.delta_sha256 != digest for e in group):
        log.warning("unit rows disagree on their delta hash; re-editing", extra={"unit": batch_id})
        return None
    try:
        return store.load(batch_id, digest, lineage)
    except MissingUnitDeltasError:
        log.info("no stored deltas; re-editing the unit", extra={"unit": batch_id})
    except UnitDeltasError as exc:
        log.warning("stored deltas unusable; re-editing the unit", extra={"error": str(exc)})
    return None


def _add_stored(
    applier: EditApplier,
    batch_id: str,
    group: Sequence[JournalEntry],
    deltas: dict[str, torch.Tensor],
) -> bool:
    """Apply a unit's verified stored deltas; False (weights unchanged) if they do not fit
    this model, so the unit is re-edited instead."""
    try:
        applier.replay_stored(batch_id, [e.event for e in group], deltas, group[0].retry_rung)
    except EditError as exc:
        log.warning("stored deltas do not fit the model; re-editing", extra={"error": str(exc)})
        return False
    return True


def rebuild_memory(applier: EditApplier, journal: Journal, before_seq: int | None = None) -> None:
    """Make the editor's memory of past edits hold exactly the applied journal entries (those
    before ``before_seq`` when given), as after a version load: units applied from stored
    deltas never passed through the editor. A no-op for editors without such a memory."""
    editor = applier.editor
    if not editor.keeps_edit_memory:
        return
    held = [
        to_request(e.event)
        for e in journal.applied_events()
        if e.event is not None
        and not e.restores_original
        and (before_seq is None or e.seq < before_seq)
    ]
    started = time.perf_counter()
    editor.reset_memory(applier.lm, held)
    log.info(
        "editor memory rebuilt",
        extra={"edits": len(held), "seconds": round(time.perf_counter() - started, 2)},
    )


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
        self.heartbeat = Heartbeat(settings.metrics.healthz_max_age_s)
        self.readiness.set("model_loaded", False, "loading the model")
        self.readiness.set("key_statistics", False, "waiting for the model")
        self._server: MetricsServer | None = None
        if serve_metrics:
            m = settings.metrics
            self._server = MetricsServer(
                self.metrics.registry, self.readiness, m.host, m.port, self.heartbeat
            )
            self._server.start()
        torch.use_deterministic_algorithms(True, warn_only=True)
        if settings.model.torch_threads is not None:
            torch.set_num_threads(settings.model.torch_threads)
        log.info("torch threads", extra={"threads": torch.get_num_threads()})
        self.lm = lm or load_model(
            settings.model.name,
            paths=self.paths,
            device=settings.model.device,
            dtype=getattr(torch, settings.model.dtype),
        )
        self.editor = editor or build_editor(settings)
        # Parameters the editor adds (the fact memory) must exist before the base weights,
        # the snapshots' names and the audit baseline are taken from the model.
        self.editor.prepare_model(self.lm)
        memory = memory_of(self.lm)
        if memory is not None:
            self.metrics.watch_memory(lambda: int(memory.used_rows().numel()), memory.capacity)
        self.applier = EditApplier(
            self.lm,
            self.editor,
            rebuild=self._rebuild_from_journal,
            retry=TransientRetry.from_settings(settings.editor),
            ladder=build_ladder(settings, self.editor),
            subset_rounds=settings.editor.subset_rounds,
        )
        settings.journal.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal = Journal.open(settings.journal.path, exclusive=True)
        self.unit_deltas = (
            UnitDeltaStore.beside(settings.journal.path) if settings.journal.store_deltas else None
        )
        # Edit material (NSE's z) is what a consolidation after a restart would recompute.
        self.material = (
            MaterialStore.beside(settings.journal.path)
            if self.editor.supports_consolidation
            else None
        )
        # The audit baseline needs the base weights: build it before any version is restored.
        auditor = None
        if audits_enabled(settings):
            from daemon.audits.runner import build_auditor

            auditor = build_auditor(settings, self.lm)
        self.versions = (
            VersionKeeper(settings, self.lm, self.journal, self.metrics)
            if (snapshots_enabled(settings))
            else None
        )
        # The unedited values, for rebuilding after an editor failure when versioning is off.
        self._base = self.versions.base if self.versions is not None else base_weights(self.lm)
        if self.editor.keeps_edit_memory:
            self.editor.set_originals(self._base.get)
            if editor is None:  # an editor passed in brings its own statistics
                self.editor.set_statistics(key_statistics(settings, self.paths))
            if self.versions is not None:
                self.versions.on_load = self._editor_holds
        self._prepare_statistics()  # the model still holds its base weights here
        if self.versions is not None:
            self.versions.editor_checkpoint = lambda: editor_checkpoint(self.editor)
            self.versions.on_snapshot = self._prune_unit_deltas
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
        self.readiness.set("model_loaded", False, "restoring a version and replaying the journal")
        self.restored = self.versions.restore() if self.versions else None
        after_seq = self.restored.journal_seq if self.restored else 0
        self.replay = replay_journal(
            self.applier, self.journal, after_seq=after_seq, store=self.unit_deltas
        )
        self._prune_unit_deltas(after_seq)
        if start_version is not None:
            if self.history is None:
                raise HistoryError("starting from a version needs versioning (snapshots) on")
            self.history.rollback(start_version, "start")
        s = settings.snapshots
        self._removals = SnapshotBackoff(s.retry_initial_s, s.retry_max_s)
        self._remove_restored()  # a crash came before a restoring correction's revert
        self.metrics.edits_applied.set(len(self.journal.applied_events()))
        version = self.versions.current_version if self.versions else None
        self.metrics.set_model_version(version or "base", self.lm.name)
        self.audits: AuditRunner | None = None
        self.schedule: AuditSchedule | None = None
        if auditor is not None:
            from daemon.audits.runner import AuditRunner
            from daemon.audits.schedule import AuditSchedule
            from daemon.operations import audit_reports_dir

            reports = audit_reports_dir(settings)
            self.audits = AuditRunner(
                settings, auditor, self.journal, self.versions, self.history, self.metrics, reports
            )
            self.schedule = AuditSchedule.from_settings(settings.audit)
            # Edits since the last audit come from the journal, not from this process: a
            # restart must not reset the count (49 + kill -9 + 54 edits ran no audit at 100).
            last_audit = self.audits.last_started_at()
            pending = self.journal.applied_count_since(last_audit)
            self.schedule.note_applied(pending)
            log.info(
                "audit schedule",
                extra={
                    "edits_since_last_audit": pending,
                    "last_audit": last_audit.isoformat() if last_audit else "never",
                },
            )
        self.consolidator = self._build_consolidator()
        on_removal = settings.consolidation.on_removal
        if self.consolidator is not None and self.history is not None and on_removal:
            self.history.rebuild = self.consolidator.rebuild
        self._applied_since_consolidation = self.replay.events
        self.inbox: ControlInbox | None = None
        self._admin: AdminServer | None = None
        if settings.admin.enabled:
            self.inbox = ControlInbox()
            self._admin = AdminServer.from_settings(settings.admin, self.inbox).start()
        self.readiness.set("model_loaded", True)
        self.consumer: FactConsumer | None = None
        self._applied_since_snapshot = self.replay.events
        s = settings.snapshots
        self._snapshot_backoff = SnapshotBackoff(s.retry_initial_s, s.retry_max_s)

    def _build_consolidator(self) -> Consolidator | None:
        """Consolidation needs versions, audits and an editor with a joint solve."""
        missing = [
            why
            for why, ok in (
                ("versioning is off", self.versions is not None),
                ("audits are off", self.audits is not None),
                (f"{self.editor.name} has no joint solve", self.editor.supports_consolidation),
            )
            if not ok
        ]
        if missing:
            if self.settings.consolidation.enabled:
                log.warning("consolidation off", extra={"because": "; ".join(missing)})
            return None
        from daemon.audits.consolidation import Consolidator

        assert self.versions is not None and self.audits is not None
        return Consolidator(
            self.settings.consolidation,
            self.editor,
            self.journal,
            self.versions,
            self.audits,
            self.metrics,
            material=self.material,
        )

    def _prepare_statistics(self) -> None:
        """Compute the editor's key statistics (safeguards, NSE) now, in one pass, before ready.

        Lazily, the first edit after a fresh start paid one full corpus pass per edited layer
        (about 9 minutes for SmolLM2) while ``/readyz`` said ready.
        """
        if not self.editor.keeps_edit_memory:
            self.readiness.set("key_statistics", True)
            return
        started = time.perf_counter()
        last_logged = [started]

        def progress(done: int, total: int) -> None:
            share = done / max(total, 1)
            reason = f"computing key statistics: {share:.0%} of {total} corpus tokens"
            self.readiness.set("key_statistics", False, reason)
            if time.perf_counter() - last_logged[0] >= STATS_LOG_EVERY_S or done >= total:
                last_logged[0] = time.perf_counter()
                log.info("key statistics", extra={"tokens_done": done, "tokens": total})

        self.readiness.set("key_statistics", False, "computing key statistics")
        matrices = self.editor.prepare_statistics(self.lm, on_progress=progress)
        self.readiness.set("key_statistics", True)
        log.info(
            "key statistics ready",
            extra={"matrices": matrices, "seconds": round(time.perf_counter() - started, 2)},
        )

    def _check_journal_against_registry(self) -> None:
        """An empty journal beside registered versions of this model means a lost journal."""
        if self.versions is None or self.accept_journal_mismatch or not self.journal.is_empty():
            return
        try:
            registered = self.versions.registry.versions()
        except RegistryUnavailableError as exc:  # MLflow down: start anyway (journal replay)
            log.warning("cannot compare the empty journal with the registry: %s", exc)
            return
        mine = [v.version for v in registered if v.tags.get("base_hash") == self.lm.base_hash]
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
        report = replay_journal(
            self.applier, self.journal, after_seq=after_seq, store=self.unit_deltas
        )
        seconds = time.perf_counter() - started
        log.warning(
            "weights rebuilt", extra={"replayed": report.events, "seconds": round(seconds, 2)}
        )

    def _editor_holds(self, event_ids: Sequence[str]) -> None:
        """The weights were just set to hold exactly ``event_ids``: the editor's memory of
        earlier edits' keys must say the same before anything is replayed on top."""
        if not self.editor.keeps_edit_memory:
            return
        entries = (self.journal.get(i) for i in event_ids)
        held = [
            to_request(e.event)
            for e in entries
            if e is not None and e.event is not None and not e.restores_original
        ]
        self.editor.reset_memory(self.lm, held)

    def _replay_after(self, seq: int) -> int:
        """History's replay (revert, rollback): recomputation is the point, so re-hash."""
        return replay_journal(
            self.applier, self.journal, after_seq=seq, rehash=True, store=self.unit_deltas
        ).events

    def _prune_unit_deltas(self, covered_seq: int) -> None:
        """Keep the stored deltas of the applied units after ``covered_seq`` (the journal seq
        of the version a restart restores), drop the rest: those units come with the version,
        and reverted, rolled-back, quarantined or never-journaled units are not replayed."""
        if self.material is not None:  # every live event's, for the next consolidation
            self.material.prune(e.event_id for e in self.journal.applied_events() if e.event_id)
        if self.unit_deltas is None:
            return
        keep = {e.batch_id for e in self.journal.applied_events(covered_seq) if e.batch_id}
        self.unit_deltas.prune(keep)

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
            ensure_topics=(
                partial(ensure_topics, self.settings.kafka)
                if self.settings.kafka.create_topics
                else None
            ),
            accept_journal_mismatch=self.accept_journal_mismatch,
            unit_deltas=self.unit_deltas,
            material=self.material,
            restore_originals=self.history is not None,
        )
        self.consumer = consumer
        previous = self._install_signals(consumer) if handle_signals else {}
        if self.schedule is not None:
            self.schedule.start()
        self.heartbeat.arm()
        try:
            stats = consumer.run(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
            if self.versions is not None and self.settings.snapshots.on_shutdown:
                self._try_snapshot("shutdown")  # the journal holds the edits either way
            return stats
        finally:
            if self.schedule is not None:
                self.schedule.shutdown()
            consumer.close()
            self.readiness.set("partitions_assigned", False)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _after_batch(self, outcome: BatchOutcome) -> None:
        self.heartbeat.beat()
        self._remove_restored()  # before the next batch, so it is edited on the reverted weights
        applied = len(outcome.applied_ids)
        self.metrics.edits_applied.inc(applied)
        self._applied_since_snapshot += applied
        self._applied_since_consolidation += applied
        if self.schedule is not None:
            self.schedule.note_applied(applied)
        self._snapshot_if_due()

    def _snapshot_if_due(self) -> None:
        """A scheduled snapshot, unless a failed one's backoff has not run out yet."""
        if (
            self.versions is not None
            and self.versions.due(self._applied_since_snapshot)
            and self._snapshot_backoff.ready()
            and self._try_snapshot("schedule")
        ):
            self._applied_since_snapshot = 0

    def _try_snapshot(self, reason: str) -> bool:
        """Snapshot now; an unreachable MLflow is counted and retried later with backoff
        instead of ending the loop (the edits are safe in the journal meanwhile)."""
        assert self.versions is not None
        try:
            self.versions.snapshot(reason)
        except RegistryUnavailableError as exc:
            wait = self._snapshot_backoff.failed()
            self.metrics.snapshot_failures.inc()
            self.metrics.snapshot_consecutive_failures.set(
                self._snapshot_backoff.consecutive_failures
            )
            log.warning(
                "snapshot failed; consuming on, retrying later",
                extra={"reason": reason, "retry_in_s": round(wait, 1), "error": str(exc)},
            )
            return False
        self._snapshot_backoff.succeeded()
        self.metrics.snapshot_consecutive_failures.set(0)
        self.metrics.snapshot_last_success.set(time.time())
        return True

    def _between_batches(self) -> None:
        """Work that must not overlap an edit (admin commands, a due audit): loop thread only.

        The loop calls this on every round without a batch pending, so it also beats.
        """
        self.heartbeat.beat()
        if self.inbox is not None and self.consumer is not None:
            for item in self.inbox.drain():
                outcome = self.consumer.execute_control(
                    item.command, source=item.source, received_at=item.received_at
                )
                self.inbox.complete(item.id, outcome)
        if self._snapshot_backoff.consecutive_failures:
            self._snapshot_if_due()  # MLflow may be back: do not wait for the next edit
        if self._removals.consecutive_failures:
            self._remove_restored()
        if self.schedule is not None:
            trigger = self.schedule.take()
            if trigger is not None:
                self.run_audit(trigger)
        if (
            self.consolidator is not None
            and self.settings.consolidation.enabled
            and self.consolidator.due(self._applied_since_consolidation)
        ):
            self.consolidate()

    def consolidate(self) -> str:
        """Consolidate now (between batches); returns the outcome line."""
        if self.consolidator is None:
            return "unsupported: consolidation needs versioning, audits and a joint solve"
        try:
            report = self.consolidator.run()
        except RegistryUnavailableError as exc:
            log.warning("consolidation deferred: MLflow unavailable", extra={"error": str(exc)})
            return f"failed: {exc}"
        except ConsolidationError as exc:
            log.error("consolidation failed", extra={"error": str(exc)})
            return f"failed: {exc}"
        finally:
            self._applied_since_consolidation = 0
        self._applied_since_snapshot = 0
        return report.line()

    def _remove_restored(self) -> None:
        """Revert the edits of facts whose newest correction restored the original answer
        (``History.remove_restored``); MLflow away or a refusal is retried with backoff."""
        if self.history is None or not self._removals.ready():
            return
        try:
            self.history.remove_restored()
        except (HistoryError, RegistryUnavailableError) as exc:
            wait = self._removals.failed()
            log.warning(
                "could not revert the edits a restoring correction superseded; retrying",
                extra={"retry_in_s": round(wait, 1), "error": str(exc)},
            )
            return
        self._removals.succeeded()

    def run_audit(self, trigger: str) -> str:
        """Audit now (between batches) and act on the gate; returns the outcome line."""
        if self.audits is None:
            return "unsupported: audits are off (audit.every_n_edits and every_minutes are 0)"
        producer = self.consumer.producer if self.consumer is not None else None
        try:
            report = self.audits.run(trigger, producer)
        except RegistryUnavailableError as exc:
            log.warning("audit deferred: MLflow unavailable", extra={"error": str(exc)})
            return f"failed: {exc}"
        self._applied_since_snapshot = 0
        verdict = "passed" if report.gate_passed else "failed: " + "; ".join(report.gate.reasons)
        return f"done: audit of version {report.version} {verdict}; action {report.action}"

    def handle_control(self, command: ControlCommand) -> str:
        """Execute ``audit``, ``consolidate``, ``snapshot``, ``rollback`` and ``revert``;
        returns the outcome line."""
        if isinstance(command, RunAudit):
            return self.run_audit("requested")
        if isinstance(command, Consolidate):
            return self.consolidate()
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
                if rev.consolidated:
                    return (
                        f"done: version {rev.new_version}; re-solved the {rev.replayed} live "
                        f"edits jointly from the base in {rev.seconds:.1f} s"
                    )
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
        except ConsolidationError as exc:
            return f"failed: {exc}; the edit is kept"
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
