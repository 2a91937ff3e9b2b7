"""The consumer loop: Kafka records in, edits applied, journal rows written, offsets committed.

Order of effects for every batch (the exactly-once *effect* rests on it):
1. apply the valid events (all of a unit or none, see ``applier``);
2. send rejected records to the DLQ and flush the producer;
3. store each applied unit's deltas beside the journal (``unit_deltas``, fsynced), for replay;
4. write one journal row per consumed record in one transaction (fsynced);
5. only then commit the Kafka offsets.
A crash before 4 loses only in-memory edits, which the restart rebuilds from the journal before
the records are consumed again (stored deltas no row names are pruned); a crash between 4 and 5
is covered by seeking past journaled offsets when partitions are assigned. DLQ delivery is
therefore at-least-once.

Two corrections of one fact (``daemon.records.live_set.fact_key``) never share a batch: staging
the second flushes the batch that holds the first, so the newer one is edited on top of the
older one and journaled after it (where it supersedes it), never solved jointly against it.

With ``restore_originals`` (the daemon sets it when versioning is on, since only ``History`` can
take edits out), a correction back to its fact's original answer (``daemon.ingest.restores``) is
not edited: it is journaled as applied without a unit, after the batch's units, in the same
transaction that supersedes the fact's earlier corrections. Their edits are still in the weights
until ``after_batch`` reverts them (``History.remove_restored``), before the next batch is
consumed; a crash in that window leaves the journal saying what to revert, and the restart does.

Shutdown flips ``stop_requested``; the loop finishes the batch in flight, journals and commits
it, and closes the consumer without auto-committing. ``run`` takes ``max_messages`` and
``idle_timeout_s`` so tests can drive it.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from daemon.config import Settings
from daemon.control.auth import verify_control
from daemon.control.commands import ControlCommand, Pause, Resume, parse_control
from daemon.errors import (
    DaemonError,
    InvalidControlError,
    InvalidEventError,
    JournalMismatchError,
)
from daemon.ingest.applier import BatchOutcome, EditApplier, to_request
from daemon.ingest.events import DlqReason, FactCorrection, dlq_headers, encode_event, parse_event
from daemon.ingest.restores import RESTORES_REASON, restores_original
from daemon.records.edit_material import MaterialStore
from daemon.records.journal import EventRecord, Journal, control_source
from daemon.records.live_set import fact_key
from daemon.records.unit_deltas import UnitDeltaStore, extend_lineage, lineage_of
from monitoring.http import Readiness
from monitoring.metrics import FactkeeperMetrics

log = logging.getLogger(__name__)

LAG_REFRESH_S = 10.0
UNASSIGNED_PAUSE_S = 0.1
METADATA_REFRESH_S = 5.0
#: How often readiness's ``broker_connected`` is re-read from the Kafka client (issue 9).
BROKER_CHECK_S = 1.0
ControlHandler = Callable[[ControlCommand], str]


@dataclass
class _Pending:
    """A consumed correction record awaiting the batch flush, with what we know of it."""

    record: object  # kafka ConsumerRecord
    event: FactCorrection | None = None
    invalid: InvalidEventError | None = None
    duplicate_of_journal: bool = False
    conflicting: bool = False

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)


@dataclass
class RunStats:
    consumed: int = 0
    results: dict[str, int] = field(default_factory=dict)

    def count(self, result: str, n: int = 1) -> None:
        self.results[result] = self.results.get(result, 0) + n


class FactConsumer:
    """Drives one model's correction stream; single-threaded by design (one writer)."""

    def __init__(
        self,
        settings: Settings,
        applier: EditApplier,
        journal: Journal,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        metrics: FactkeeperMetrics,
        readiness: Readiness,
        on_control: ControlHandler | None = None,
        after_batch: Callable[[BatchOutcome], None] | None = None,
        between_batches: Callable[[], None] | None = None,
        ensure_topics: Callable[[], object] | None = None,
        accept_journal_mismatch: bool = False,
        unit_deltas: UnitDeltaStore | None = None,
        material: MaterialStore | None = None,
        restore_originals: bool = False,
    ) -> None:
        self.settings = settings
        self.restore_originals = restore_originals
        """Journal corrections back to the original answer without an edit (module docstring)."""
        self.unit_deltas = unit_deltas
        """Where each applied unit's deltas are kept for replay (None: replay re-edits)."""
        self.material = material
        """Where each applied event's edit material is kept for consolidation (None: not)."""
        self.accept_journal_mismatch = accept_journal_mismatch
        self.topics = settings.kafka.topics
        self.applier = applier
        self.journal = journal
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.readiness = readiness
        self.on_control = on_control
        self.after_batch = after_batch
        self.between_batches = between_batches
        # Creates missing topics; retried while unassigned until it succeeds once.
        self._ensure_topics = ensure_topics
        self.stop_requested = threading.Event()
        self.assignment_changed = threading.Event()
        # A pause outlives a restart (issue 17): the journal holds the last pause/resume.
        self.paused = journal.paused()
        if self.paused:
            log.warning("paused (from the journal): corrections wait for a resume command")
        self.stats = RunStats()
        self._pending: list[_Pending] = []
        self._pending_since = 0.0
        self._last_lag = 0.0
        self._last_metadata_refresh = 0.0
        # Highest journaled offset per (topic, partition): records at or below it were handled
        # before a crash that came between the journal write and the offset commit.
        self._journaled = dict(journal.last_offsets())
        # The same for control records: one executed before a crash that lost its offset commit
        # must not run again over the edits made since (issue 17, item 5).
        self._journaled.update(journal.control_offsets())
        # Control partitions -> end offset at assignment: until they are read up to it, no
        # correction is taken, so a command sent before a correction also acts before it.
        self._control_catch_up: dict[TopicPartition, int] = {}

    # -- the loop ------------------------------------------------------------------------------

    def run(self, max_messages: int | None = None, idle_timeout_s: float | None = None) -> RunStats:
        """Consume until stopped, ``max_messages`` records were consumed, or idle for long."""
        self._create_topics()
        self.consumer.subscribe(
            [self.topics.corrections, self.topics.control], listener=_Listener(self)
        )
        self._check_fresh_journal()
        last_activity = time.monotonic()
        linger_s = self.settings.batching.linger_ms / 1000
        broker_watch = _BrokerWatch(self.consumer, self.readiness).start()
        try:
            while not self.stop_requested.is_set():
                budget = self.settings.batching.max_size - self._valid_pending()
                polled = self.consumer.poll(
                    timeout_ms=max(50, int(linger_s * 1000)), max_records=max(1, budget)
                )
                records = arrival_order(polled.values(), self.topics.control)
                if not records and not self.consumer.assignment():
                    self._wait_for_assignment()
                if self.assignment_changed.is_set():
                    self.assignment_changed.clear()
                    self._start_control_catch_up()
                    self._apply_pause()
                records = self._hold_back_corrections(records)
                for record in records:
                    self.stats.consumed += 1
                    if record.topic == self.topics.control:
                        self.flush()
                        self._handle_control(record)
                    else:
                        self._stage(record)
                self._end_control_catch_up()
                if self._pending and (
                    not records
                    or self._valid_pending() >= self.settings.batching.max_size
                    or time.monotonic() - self._pending_since >= linger_s
                ):
                    self.flush()
                if not self._pending and self.between_batches is not None:
                    self.between_batches()  # scheduled audits, admin commands: never mid-batch
                if records or not self.consumer.assignment():
                    # Idle time starts once the work is done, and only counts while we hold
                    # partitions (a restart may wait for the group to drop a dead member).
                    last_activity = time.monotonic()
                self._refresh_lag()
                if max_messages is not None and self.stats.consumed >= max_messages:
                    break
                idle = time.monotonic() - last_activity
                if idle_timeout_s is not None and idle >= idle_timeout_s and not self._pending:
                    break
        finally:
            broker_watch.stop()
            self.flush()
        return self.stats

    def _wait_for_assignment(self) -> None:
        """Unassigned, ``poll`` returns at once: pause instead of spinning, and refresh metadata.

        We saw a member restarted after ``kill -9`` (static membership) join with metadata that
        did not list its topics, get no partitions, and spin for 14 minutes. kafka-python asks
        to rejoin when the metadata of a subscribed topic changes, so fetch it now and then.
        """
        time.sleep(UNASSIGNED_PAUSE_S)
        if time.monotonic() - self._last_metadata_refresh >= METADATA_REFRESH_S:
            self._last_metadata_refresh = time.monotonic()
            self._create_topics()
            try:
                self.consumer.topics()
            except KafkaError as exc:
                log.debug("metadata refresh failed", extra={"error": str(exc)})

    def _create_topics(self) -> None:
        """Create the topics if they are missing; a broker that is away is retried later."""
        if self._ensure_topics is None:
            return
        try:
            self._ensure_topics()
        except KafkaError as exc:
            log.warning("could not create the topics yet", extra={"error": str(exc)})
            return
        self._ensure_topics = None

    def close(self) -> None:
        """Close the clients without auto-committing anything we did not journal."""
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.producer.flush()
            self.producer.close()

    # -- staging -------------------------------------------------------------------------------

    def _check_fresh_journal(self) -> None:
        """An empty journal beside committed offsets means the journal was lost: refuse."""
        if self.accept_journal_mismatch or not self.journal.is_empty():
            return
        topic = self.topics.corrections
        try:
            partitions = self.consumer.partitions_for_topic(topic) or set()
            committed = {p: self.consumer.committed(TopicPartition(topic, p)) for p in partitions}
        except KafkaError as exc:
            log.warning("committed offsets unavailable", extra={"error": str(exc)})
            return
        ahead = {p: o for p, o in committed.items() if o}
        if ahead:
            raise JournalMismatchError(
                f"the journal at {self.journal.path} is empty, but group "
                f"{self.settings.kafka.group_id!r} has committed offsets on {topic} {ahead}: "
                "the corrections before them would be skipped and the model would start from "
                "the base weights"
            )

    def _matches_journal(self, record: object) -> bool:
        """Whether the journal row at this record's position is this record."""
        entry = self.journal.event_at(record.topic, record.partition, record.offset)
        if entry is None:
            return False
        try:
            event = parse_event(record.value)
        except InvalidEventError:
            return entry.event is None
        return entry.event is not None and encode_event(entry.event) == encode_event(event)

    def _stage(self, record: object) -> None:
        done_upto = self._journaled.get((record.topic, record.partition), -1)
        if record.offset <= done_upto and not self._matches_journal(record):
            where = f"{record.topic}[{record.partition}]@{record.offset}"
            if not self.accept_journal_mismatch:
                raise JournalMismatchError(
                    f"record {where} is not the one the journal holds at that offset (was the "
                    "topic deleted and re-created?); skipping it as already journaled would "
                    "drop it"
                )
            suffix = f"retired-{datetime.now(UTC):%Y%m%dT%H%M%S}"
            moved = self.journal.retire_partition(record.topic, record.partition, suffix)
            log.warning(
                "journal rows of a re-created partition retired",
                extra={"at": where, "rows": moved, "suffix": suffix},
            )
            self._journaled.pop((record.topic, record.partition), None)
            done_upto = -1
        if record.offset <= done_upto:  # journaled before a crash; only the commit was lost
            tp = TopicPartition(record.topic, record.partition)
            self._commit_offsets({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
            self.stats.count("already-journaled")
            return
        pending = _Pending(record)
        try:
            pending.event = parse_event(record.value)
        except InvalidEventError as exc:
            pending.invalid = exc
        else:
            earlier = self._staged_event(pending.event.id)
            if earlier is not None or self.journal.has_event(pending.event.id):
                pending.duplicate_of_journal = True
                previous = earlier or self.journal.get(pending.event.id).event
                pending.conflicting = previous is not None and encode_event(
                    previous
                ) != encode_event(pending.event)
            elif self._fact_staged(pending.event):
                self.flush()  # the older correction of this fact first, in a batch of its own
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(pending)

    def _staged_event(self, event_id: str) -> FactCorrection | None:
        for p in self._pending:
            if p.event is not None and not p.duplicate_of_journal and p.event.id == event_id:
                return p.event
        return None

    def _fact_staged(self, event: FactCorrection) -> bool:
        """Whether a staged correction (not a duplicate) is of the same fact as ``event``."""
        key = fact_key(event)
        return any(
            p.event is not None and not p.duplicate_of_journal and fact_key(p.event) == key
            for p in self._pending
        )

    def _valid_pending(self) -> int:
        return sum(1 for p in self._pending if p.event is not None and not p.duplicate_of_journal)

    # -- the flush: apply, DLQ, journal, commit --------------------------------------------------

    def flush(self) -> None:
        """Apply, journal and commit everything staged; a no-op when nothing is."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        events = [p.event for p in pending if p.event is not None and not p.duplicate_of_journal]
        restoring = self._restoring(events)
        started = time.perf_counter()
        outcome = self.applier.apply([e for e in events if e.id not in restoring])
        seconds = time.perf_counter() - started
        try:
            self._send_rejections(pending, outcome)
            self._store_unit_deltas(outcome)
            materials = self._store_material(outcome)
            self.journal.record_batch(self._rows(pending, outcome, restoring, materials))
        except Exception:
            # The journal is the truth: an edit it does not hold must not stay in the weights.
            for unit in reversed(outcome.applied):
                self.applier.undo(unit)
            if self.unit_deltas is not None:
                self.unit_deltas.discard(unit.batch_id for unit in outcome.applied)
            raise
        for p in pending:
            key = (p.record.topic, p.record.partition)
            self._journaled[key] = max(self._journaled.get(key, -1), p.record.offset)
        self._commit(pending)
        self._count(pending, outcome, seconds)
        if self.after_batch is not None:
            self.after_batch(outcome)

    def _restoring(self, events: list[FactCorrection]) -> set[str]:
        """The ids of ``events`` that restore their fact's original answer (none unless
        ``restore_originals``); a chain is the journal's plus earlier events of the batch."""
        if not self.restore_originals:
            return set()
        found: set[str] = set()
        chains: dict[str, list[FactCorrection]] = {}
        for event in events:
            key = fact_key(event)
            if key not in chains:
                chains[key] = [e.event for e in self.journal.fact_chain(event) if e.event]
            if restores_original(event, chains[key]):
                found.add(event.id)
                chains[key] = []  # restored: a later correction starts a new chain
            else:
                chains[key].append(event)
        if found:
            log.info("corrections restore the original answer", extra={"events": sorted(found)})
        return found

    def _store_unit_deltas(self, outcome: BatchOutcome) -> None:
        """Each applied unit's deltas, before its journal rows: a crash in between leaves a
        file no row names (pruned later), never a row whose replay reads a half-written one."""
        if self.unit_deltas is None or not outcome.applied:
            return
        lineage = lineage_of(self.journal.applied_lineage())  # what the weights held before
        for unit in outcome.applied:
            self.unit_deltas.try_write(unit.batch_id, unit.result.deltas, lineage)
            digest = unit.result.delta_sha256()
            lineage = extend_lineage(lineage, [(e.id, unit.batch_id, digest) for e in unit.events])

    def _send_rejections(self, pending: list[_Pending], outcome: BatchOutcome) -> None:
        now = datetime.now(UTC)
        sent = []
        for p in pending:
            reason: DlqReason | None = None
            if p.invalid is not None:
                reason, detail, event_id = (
                    p.invalid.reason_code,
                    p.invalid.detail,
                    p.invalid.event_id,
                )
            elif p.conflicting:
                reason, detail, event_id = (
                    "conflicting-duplicate",
                    "an event with this id and a different payload was already consumed",
                    p.event.id,
                )
            elif (
                p.event is not None and p.event.id in outcome.failed and not p.duplicate_of_journal
            ):
                reason, detail, event_id = "edit-failed", outcome.failed[p.event.id], p.event.id
            if reason is None:
                continue
            r = p.record
            headers = dlq_headers(
                reason, detail, r.topic, r.partition, r.offset, now, event_id=event_id
            )
            sent.append(
                self.producer.send(self.topics.dlq, value=r.value, key=r.key, headers=headers)
            )
        if sent:
            self.producer.flush()
            for future in sent:
                # A record the broker did not take raises here, before anything is journaled or
                # committed: the batch is undone and consumed again, never silently dropped.
                future.get(timeout=0)

    def _store_material(self, outcome: BatchOutcome) -> dict[str, str]:
        """Each applied event's edit material, before its journal row (as the unit deltas);
        returns event id -> the sha256 its row records."""
        if self.material is None:
            return {}
        stored = {}
        for unit in outcome.applied:
            editor = self.applier.editor_of(unit)
            requests = [to_request(e) for e in unit.events]
            for event_id, material in editor.edit_material(self.applier.lm, requests).items():
                digest = self.material.try_write(event_id, material)
                if digest is not None:
                    stored[event_id] = digest
        return stored

    def _rows(
        self,
        pending: list[_Pending],
        outcome: BatchOutcome,
        restoring: set[str],
        materials: Mapping[str, str] | None = None,
    ) -> list[EventRecord]:
        """One row per record; the applied ones in the order their units were applied, then
        the ones that restore an original answer (no unit: last, so the units' stored lineage
        is the journal's order)."""
        units = {e.id: unit for unit in outcome.applied for e in unit.events}
        now = datetime.now(UTC)
        rows = []
        for p in pending:
            r = p.record
            base = {
                "topic": r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "received_at": now,
            }
            if p.invalid is not None:
                rows.append(EventRecord(status="invalid", reason=p.invalid.reason_code, **base))
            elif p.duplicate_of_journal:
                reason = "conflicting-duplicate" if p.conflicting else "duplicate"
                rows.append(EventRecord(status="duplicate", event=p.event, reason=reason, **base))
            elif p.event.id in restoring:
                rows.append(
                    EventRecord(
                        status="applied",
                        event=p.event,
                        reason=RESTORES_REASON,
                        applied_at=now,
                        restores_original=True,
                        **base,
                    )
                )
            elif p.event.id in units:
                unit = units[p.event.id]
                rows.append(
                    EventRecord(
                        status="applied",
                        event=p.event,
                        applied_at=now,
                        edit_seconds=unit.seconds,
                        delta_norms=unit.result.delta_norms(),
                        delta_sha256=unit.result.delta_sha256(),
                        batch_id=unit.batch_id,
                        retry_rung=unit.retry_rung,
                        material_sha256=(materials or {}).get(p.event.id),
                        **base,
                    )
                )
            else:
                reason = outcome.failed.get(p.event.id, "edit did not take")
                rows.append(EventRecord(status="failed", event=p.event, reason=reason, **base))
        ordered = _in_unit_order(rows, outcome)
        return [r for r in ordered if not r.restores_original] + [
            r for r in ordered if r.restores_original
        ]

    def _commit(self, pending: list[_Pending]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for p in pending:
            offsets[p.tp] = OffsetAndMetadata(p.record.offset + 1, "", -1)
        self._commit_offsets(offsets)

    def _commit_offsets(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        try:
            self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The journal already holds these rows; reassignment seeks past them.
            log.warning("offset commit failed; journal rows are durable", extra={"error": str(exc)})

    def _count(self, pending: list[_Pending], outcome: BatchOutcome, seconds: float) -> None:
        for p in pending:
            if p.invalid is not None:
                result = "invalid"
            elif p.duplicate_of_journal:
                result = "duplicate"
            elif p.event.id in outcome.failed:
                result = "failed"
            else:
                result = "applied"
            self.metrics.events.labels(result=result).inc()
            self.stats.count(result)
        for unit in outcome.applied:
            self.metrics.edits_by_rung.labels(rung=unit.stage).inc(len(unit.events))
        if outcome.applied or outcome.failed:
            self.metrics.edit_duration.observe(seconds)
            self.metrics.edit_batch_size.observe(len(outcome.applied_ids) + len(outcome.failed))
        log.info(
            "batch journaled",
            extra={
                "records": len(pending),
                "applied": len(outcome.applied_ids),
                "failed": len(outcome.failed),
                "seconds": round(seconds, 3),
            },
        )

    # -- control ---------------------------------------------------------------------------------

    def _handle_control(self, record: object) -> None:
        tp = TopicPartition(record.topic, record.partition)
        if record.offset <= self._journaled.get((record.topic, record.partition), -1):
            # Journaled (executed or refused) before a crash; only the offset commit was lost.
            self._commit_offsets({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
            self.stats.count("already-journaled")
            log.info("control record already journaled; skipped", extra={"offset": record.offset})
            return
        now = datetime.now(UTC)
        source = control_source(record.topic, record.partition, record.offset)
        try:
            command = parse_control(record.value)
        except InvalidControlError as exc:
            log.warning("invalid control command", extra={"reason": exc.reason_code, "at": source})
            self.metrics.events.labels(result="invalid").inc()
        else:
            refusal = self._authenticate(record)
            if refusal is not None:
                outcome = f"refused: unauthenticated ({refusal})"
                log.warning("control command refused", extra={"reason": refusal, "at": source})
                self.journal.record_control(
                    command, received_at=now, outcome=outcome, source=source
                )
            else:
                self.execute_control(command, source=source, received_at=now)
        self._journaled[(record.topic, record.partition)] = record.offset
        self._commit_offsets({tp: OffsetAndMetadata(record.offset + 1, "", -1)})

    def _authenticate(self, record: object) -> str | None:
        """Why a control record may not run, or None (signed, fresh, first seen)."""
        control = self.settings.control
        if not control.keys:
            if control.allow_unsigned:
                return None
            return "no control.keys configured and control.allow_unsigned is false"
        verdict = verify_control(
            record.value,
            record.headers,
            keys=control.keys,
            topic=record.topic,
            group=self.settings.kafka.group_id,
            max_age_s=control.max_age_s,
        )
        if not verdict.ok:
            return verdict.reason
        fresh = self.journal.remember_nonce(
            verdict.nonce, verdict.key_id, verdict.issued_at, time.time() - control.max_age_s
        )
        return None if fresh else "replayed: nonce already seen"

    def execute_control(
        self, command: ControlCommand, *, source: str, received_at: datetime
    ) -> str:
        """Run an authenticated command between batches and journal its outcome."""
        try:
            outcome = self._execute(command)
        except DaemonError as exc:
            outcome = f"failed: {exc}"
        self.journal.record_control(
            command, received_at=received_at, outcome=outcome, source=source
        )
        log.info("control command", extra={"command": command.command, "outcome": outcome})
        return outcome

    def _execute(self, command: ControlCommand) -> str:
        if isinstance(command, Pause):
            self.paused = True
            self._apply_pause()
            return "done"
        if isinstance(command, Resume):
            self.paused = False
            self.consumer.resume(*self._correction_partitions())
            return "done"
        if self.on_control is None:
            return "unsupported: no handler for this command"
        return self.on_control(command)

    # -- control before corrections at assignment -------------------------------------------

    def _start_control_catch_up(self) -> None:
        """Hold corrections back until the control topic is read to its end as of now.

        On (re)assignment the correction partitions usually resume from a committed offset
        while the control partition still resolves its position, so the first polls return
        corrections produced after a pending ``rollback``; applying them first would let the
        rollback discard them (issue 17, item 5).
        """
        control = [tp for tp in self.consumer.assignment() if tp.topic == self.topics.control]
        try:
            ends = self.consumer.end_offsets(control) if control else {}
        except KafkaError as exc:
            log.warning("control end offsets unavailable", extra={"error": str(exc)})
            ends = {}
        self._control_catch_up = {tp: end for tp, end in ends.items() if end > 0}

    def _hold_back_corrections(self, records: list) -> list:
        """While catching up, drop this poll's corrections and seek back to fetch them later.

        The correction partitions are not paused meanwhile: kafka-python never fetched a
        partition again that was sought while paused and then resumed, so every correction
        after a control record read during the catch-up stalled (tests/reliability/long_run.py
        ``control-redelivered``, tests/reliability/test_redelivery.py).
        """
        if not self._control_catch_up:
            return records
        first: dict[TopicPartition, int] = {}
        for r in records:
            if r.topic != self.topics.control:
                tp = TopicPartition(r.topic, r.partition)
                first[tp] = min(first.get(tp, r.offset), r.offset)
        for tp, offset in first.items():
            self.consumer.seek(tp, offset)
        return [r for r in records if r.topic == self.topics.control]

    def _end_control_catch_up(self) -> None:
        if not self._control_catch_up:
            return
        try:
            behind = {
                tp: end
                for tp, end in self._control_catch_up.items()
                if tp in self.consumer.assignment() and self.consumer.position(tp) < end
            }
        except KafkaError as exc:
            log.debug("control position unavailable", extra={"error": str(exc)})
            return
        self._control_catch_up = behind
        if not behind:
            self.consumer.resume(*self._correction_partitions())
            self._apply_pause()

    def _correction_partitions(self) -> list[TopicPartition]:
        return [tp for tp in self.consumer.assignment() if tp.topic == self.topics.corrections]

    def _apply_pause(self) -> None:
        if self.paused:
            self.consumer.pause(*self._correction_partitions())

    # -- lag -------------------------------------------------------------------------------------

    def _refresh_lag(self) -> None:
        if time.monotonic() - self._last_lag < LAG_REFRESH_S:
            return
        self._last_lag = time.monotonic()
        partitions = self._correction_partitions()
        if not partitions:
            return
        try:
            ends = self.consumer.end_offsets(partitions)
            self.metrics.set_lag(
                {tp.partition: max(0, ends[tp] - self.consumer.position(tp)) for tp in partitions}
            )
        except KafkaError as exc:
            log.debug("lag refresh failed", extra={"error": str(exc)})


def arrival_order(batches: Iterable[list], control_topic: str) -> list:
    """The records of one poll in the order they were produced, across topics.

    Each partition's records stay in offset order; partitions are merged by record timestamp,
    a control record first on a tie. Sorting by topic name instead applied corrections that
    came *after* a ``rollback`` before it, and the rollback then discarded them (issue 17,
    item 5).
    """
    streams = [sorted(batch, key=lambda r: r.offset) for batch in batches]
    return list(heapq.merge(*streams, key=lambda r: (r.timestamp, r.topic != control_topic)))


class _Listener(ConsumerRebalanceListener):
    """Notes assignment changes for the main loop.

    kafka-python 3 calls listeners from its IO thread, which must not touch the model or the
    journal (both belong to the loop's thread); the loop reacts after its next poll.
    """

    def __init__(self, owner: FactConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.owner.readiness.set("partitions_assigned", False)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.assignment_changed.set()
        self.owner.readiness.set("partitions_assigned", bool(assigned))


class _BrokerWatch:
    """Keeps readiness's ``broker_connected`` current while the loop runs (issue 9).

    It is a thread of its own because the loop can sit for a whole request timeout (30 s) in a
    commit, a DLQ flush or a lag query while the broker is away, and ``/readyz`` must say so
    meanwhile. It reads kafka-python's ``connection-count`` metric (the broker connections the
    client holds: 0 while no broker answers, back above 0 once it reconnects by itself) and
    writes only the locked readiness, never the model or the journal.
    """

    def __init__(self, consumer: KafkaConsumer, readiness: Readiness) -> None:
        self.consumer = consumer
        self.readiness = readiness
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="broker-watch", daemon=True)

    def start(self) -> _BrokerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; the consumer is about to close, so the broker no longer counts."""
        self._done.set()
        self._thread.join()
        self.readiness.set("broker_connected", False)

    def connections(self) -> int | None:
        """Broker connections the consumer holds (open or opening); None if metrics are off."""
        for name, metric in (self.consumer.metrics(raw=True) or {}).items():
            if name.group == "consumer-metrics" and name.name == "connection-count":
                return int(metric.value())
        return None

    def _watch(self) -> None:
        was_connected = False
        seen = 0  # consecutive checks that found a connection (or could not tell: no metrics)
        while not self._done.is_set():
            count = self.connections()
            seen = seen + 1 if count is None or count > 0 else 0
            # Two in a row: a reconnect attempt to a dead broker holds a connection object for
            # an instant, and one check landing in that instant must not report ready.
            connected = seen >= 2
            if was_connected and not connected:
                log.warning("lost every broker connection; not ready until the client reconnects")
            elif connected and not was_connected:
                log.info("broker connection up; ready once partitions are assigned")
            was_connected = connected
            self.readiness.set("broker_connected", connected)
            self._done.wait(BROKER_CHECK_S)


def _in_unit_order(rows: list[EventRecord], outcome: BatchOutcome) -> list[EventRecord]:
    """``rows`` with the applied ones reordered (in the slots they hold) as they were applied.

    Replay re-applies units in journal order, each unit's rows together, so a unit applied
    after the retry ladder kept another (a batch's passing edits, then a failed one alone on a
    rung) must come after it, whatever the records' offsets.
    """
    order = {event_id: i for i, event_id in enumerate(outcome.applied_ids)}
    slots = [i for i, row in enumerate(rows) if row.status == "applied" and row.event_id in order]
    applied = sorted((rows[i] for i in slots), key=lambda row: order[row.event_id])
    reordered = list(rows)
    for slot, row in zip(slots, applied, strict=True):
        reordered[slot] = row
    return reordered
