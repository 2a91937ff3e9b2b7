"""The durable journal: every consumed record and control command, with its outcome.

The model is always "latest snapshot + replay of the applied journal entries after it", and a
Kafka offset is committed only once its journal row is durable, so this file is the daemon's
source of truth. It is SQLite in WAL mode with ``synchronous=FULL`` (the WAL is fsynced on every
commit), schema-versioned through ``PRAGMA user_version`` with ordered migrations.

Every consumed record gets exactly one row, unique by (topic, partition, offset), including
invalid records and redeliveries. An event id is *claimed* by its first row whose status is not
``invalid`` or ``duplicate``; at most one row claims an id. The consumer checks ``has_event``
first and journals a redelivery as ``duplicate``; if it tries to claim an id twice anyway,
``record_batch`` raises ``DuplicateEventError`` and writes nothing (the journal enforces the
rule, the consumer decides what to do).

Corrections of one fact (``daemon.records.live_set``): an applied row is ``superseded_by`` the
next newer applied correction of the same fact, set in the transaction that journals the newer
one and linked again in any transaction that changes a status (``mark``), so the live set
(``live_events``: applied, not superseded) never holds two corrections of one fact. The older
row stays ``applied``: its edit is still in the weights' history that replay, rollback and
versions count. A correction that restores the original answer is journaled ``applied`` without
a unit and linked to itself (``restores_original``): replay skips it, and the edits of its fact
before it (``awaiting_removal``) are reverted right after its batch (``History.remove_restored``).

Thread-safety: one writer thread. A ``Journal`` must be used only by the thread that opened it
(sqlite3 enforces this); other processes and threads (``factkeeper status``) open their own.

One writer process: the daemon opens its journal with ``exclusive=True``, which takes an
exclusive ``flock`` on ``<journal>.lock`` beside it for as long as the journal is open, so a
second daemon on the same file (a second pod on the same volume, a second ``factkeeper run``)
fails at once with ``JournalLockedError`` instead of interleaving writes. The kernel drops the
lock when the process dies, so a crash never leaves a stale lock behind. Readers
(``factkeeper status``, ``versions``, ``report``) do not take it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

from pydantic import TypeAdapter

from daemon.control.commands import ControlCommand, encode_control
from daemon.errors import (
    DuplicateEventError,
    DuplicateOffsetError,
    JournalError,
    JournalLockedError,
    UnknownEventError,
)
from daemon.ingest.events import FactCorrection, encode_event, stored_event
from daemon.records.live_set import fact_key, links

log = logging.getLogger(__name__)

EventStatus = Literal[
    "applied", "failed", "invalid", "duplicate", "rolled_back", "quarantined", "reverted"
]
STATUSES: tuple[EventStatus, ...] = get_args(EventStatus)
#: Outcomes a record can have when it is first journaled.
ARRIVAL_STATUSES: frozenset[str] = frozenset({"applied", "failed", "invalid", "duplicate"})
#: Rows with these statuses do not claim their event id.
UNCLAIMED_STATUSES: frozenset[str] = frozenset({"invalid", "duplicate"})
#: Statuses ``mark`` may set on a claiming row (rollback, revert, quarantine, re-apply).
MARK_STATUSES: frozenset[str] = frozenset(STATUSES) - UNCLAIMED_STATUSES

Pragma = Literal["journal_mode", "synchronous", "user_version", "application_id"]
APPLICATION_ID = 0x464B4A4C  # "FKJL": tells a journal apart from any other SQLite file
_MIN_SQLITE = (3, 37, 0)  # STRICT tables
_STATUS_SQL = ", ".join(f"'{status}'" for status in STATUSES)
_UNCLAIMED_SQL = ", ".join(f"'{status}'" for status in sorted(UNCLAIMED_STATUSES))

#: A migration step: SQL, or a function run on the connection in the same transaction.
MigrationStep = str | Callable[[sqlite3.Connection], None]
#: ``_MIGRATIONS[i]`` takes the schema from ``user_version`` i to i + 1; append, never edit.
_MIGRATIONS: tuple[tuple[MigrationStep, ...], ...] = (
    (
        f"""CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT,
            topic TEXT NOT NULL,
            "partition" INTEGER NOT NULL CHECK ("partition" >= 0),
            "offset" INTEGER NOT NULL CHECK ("offset" >= 0),
            status TEXT NOT NULL CHECK (status IN ({_STATUS_SQL})),
            reason TEXT,
            payload TEXT,
            received_at TEXT NOT NULL,
            applied_at TEXT,
            edit_seconds REAL,
            delta_norms TEXT,
            model_version TEXT,
            batch_id TEXT,
            UNIQUE (topic, "partition", "offset"),
            CHECK ((payload IS NULL) = (event_id IS NULL))
        ) STRICT""",
        f"""CREATE UNIQUE INDEX events_claimed_id ON events (event_id)
            WHERE status NOT IN ({_UNCLAIMED_SQL})""",
        "CREATE INDEX events_by_id ON events (event_id)",
        "CREATE INDEX events_by_status ON events (status, seq)",
        """CREATE TABLE control_commands (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            command TEXT NOT NULL,
            received_at TEXT NOT NULL,
            outcome TEXT NOT NULL,
            source TEXT
        ) STRICT""",
    ),
    # 2: the sha256 of each applied unit's weight change, checked when the journal is replayed.
    ("ALTER TABLE events ADD COLUMN delta_sha256 TEXT",),
)
_MIGRATIONS += (
    (
        # Nonces of signed control records, kept for the staleness window (issue 17, item 10).
        """CREATE TABLE control_nonces (
            nonce TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            issued_at REAL NOT NULL
        ) STRICT""",
    ),
)
_MIGRATIONS += (
    # 4: the retry-ladder rung that applied a unit (``daemon.ingest.applier.rung_spec``; NULL: the
    # configured editor), so replay re-applies the unit with the same editor.
    ("ALTER TABLE events ADD COLUMN retry_rung TEXT",),
)


def _relink(conn: sqlite3.Connection, subjects: Iterable[str]) -> None:
    """Set ``superseded_by`` of the applied rows of these subjects' facts as ``links`` says.

    Only applied rows are linked: a row that left the applied set keeps its last link for the
    record, and one that comes back (a roll forward) is linked again with the others.
    """
    for subject in sorted(set(subjects)):
        rows = conn.execute(
            "SELECT event_id, payload, superseded_by FROM events WHERE status = 'applied' "
            "AND json_extract(payload, '$.subject') = ? ORDER BY seq",
            (subject,),
        ).fetchall()
        facts: dict[str, list[tuple[str, bool]]] = {}
        current: dict[str, str | None] = {}
        for event_id, payload, superseded_by in rows:
            key = fact_key(stored_event(payload))
            facts.setdefault(key, []).append((event_id, superseded_by == event_id))
            current[event_id] = superseded_by
        for chain in facts.values():
            for event_id, target in links(chain).items():
                if current[event_id] != target:
                    conn.execute(
                        "UPDATE events SET superseded_by = ? "
                        "WHERE event_id = ? AND status = 'applied'",
                        (target, event_id),
                    )


def _link_existing(conn: sqlite3.Connection) -> None:
    """Link the corrections journaled before ``superseded_by`` existed."""
    subjects = conn.execute(
        "SELECT DISTINCT json_extract(payload, '$.subject') FROM events WHERE status = 'applied'"
    ).fetchall()
    _relink(conn, (subject for (subject,) in subjects if subject is not None))


_MIGRATIONS += (
    # 5: the newer correction of the same fact that replaced an applied one (NULL: live;
    # ``daemon.records.live_set``), linked for the rows already journaled.
    (
        "ALTER TABLE events ADD COLUMN superseded_by TEXT",
        "CREATE INDEX events_by_subject ON events (json_extract(payload, '$.subject'))",
        _link_existing,
    ),
)
_MIGRATIONS += (
    # 6: the sha256 of each applied event's edit material beside the journal
    # (``daemon.records.edit_material``), which a consolidation reuses instead of recomputing.
    ("ALTER TABLE events ADD COLUMN material_sha256 TEXT",),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_EVENT_COLUMNS = (
    'seq, event_id, topic, "partition", "offset", status, reason, payload, received_at, '
    "applied_at, edit_seconds, delta_norms, model_version, batch_id, delta_sha256, retry_rung, "
    "superseded_by, material_sha256"
)
_CONTROL_ADAPTER: TypeAdapter[ControlCommand] = TypeAdapter(ControlCommand)


@dataclass(frozen=True)
class EventRecord:
    """One consumed record and its outcome, as the consumer journals it.

    ``event`` is the validated event (``None`` only for ``invalid``); ``reason`` is required for
    ``failed`` and ``invalid``; ``applied_at`` for ``applied``. Datetimes must be aware.
    """

    topic: str
    partition: int
    offset: int
    status: EventStatus
    received_at: datetime
    event: FactCorrection | None = None
    reason: str | None = None
    applied_at: datetime | None = None
    edit_seconds: float | None = None
    delta_norms: Mapping[str, float] | None = None
    model_version: str | None = None
    batch_id: str | None = None
    delta_sha256: str | None = None  # of the unit the event was applied in (applied only)
    retry_rung: str | None = None  # the ladder rung that applied the unit; None: the editor
    restores_original: bool = False  # applied without an edit: its fact's edits are reverted
    material_sha256: str | None = None  # of the event's stored edit material (applied only)

    def __post_init__(self) -> None:
        if self.status not in ARRIVAL_STATUSES:
            raise ValueError(f"a record arrives as one of {sorted(ARRIVAL_STATUSES)}")
        if (self.event is None) != (self.status == "invalid"):
            raise ValueError("an invalid record has no event; every other record has one")
        if self.status in {"failed", "invalid"} and not self.reason:
            raise ValueError(f"a {self.status} record needs a reason")
        if self.status == "applied" and self.applied_at is None:
            raise ValueError("an applied record needs applied_at")
        if self.partition < 0 or self.offset < 0:
            raise ValueError("partition and offset are non-negative")
        for stamp in (self.received_at, self.applied_at):
            if stamp is not None and stamp.tzinfo is None:
                raise ValueError("timestamps must be timezone-aware")
        if self.restores_original and (
            self.status != "applied" or self.batch_id is not None or self.delta_sha256 is not None
        ):
            raise ValueError("a correction that restores the original answer is applied, no unit")

    @property
    def event_id(self) -> str | None:
        return self.event.id if self.event is not None else None


@dataclass(frozen=True)
class JournalEntry:
    """A journaled record as read back; ``event`` is parsed from the stored JSON without the
    input limits (``daemon.ingest.events.stored_event``)."""

    seq: int
    event_id: str | None
    topic: str
    partition: int
    offset: int
    status: EventStatus
    reason: str | None
    event: FactCorrection | None
    received_at: datetime
    applied_at: datetime | None
    edit_seconds: float | None
    delta_norms: dict[str, float] | None
    model_version: str | None
    batch_id: str | None
    delta_sha256: str | None = None
    retry_rung: str | None = None
    material_sha256: str | None = None
    superseded_by: str | None = None  # the newer correction of the same fact; None: live

    @property
    def restores_original(self) -> bool:
        """Journaled without an edit of its own: it put its fact's original answer back, by
        reverting the fact's earlier edits (it links to itself; ``live_set.links``)."""
        return self.event_id is not None and self.superseded_by == self.event_id


@dataclass(frozen=True)
class ControlEntry:
    """A journaled control command."""

    seq: int
    command: ControlCommand
    received_at: datetime
    outcome: str
    source: str | None


def writer_lock_path(path: Path) -> Path:
    """The lock file beside the journal that one writer process holds."""
    return path.with_name(path.name + ".lock")


def _acquire_writer_lock(path: Path) -> int:
    """Take an exclusive, non-blocking ``flock`` on the journal's lock file; return its fd.

    Raises:
        JournalLockedError: another open file description (another process) holds it.
        JournalError: the lock file cannot be created.
    """
    lock_path = writer_lock_path(path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(f"cannot create the journal lock {lock_path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        raise JournalLockedError(str(lock_path), holder) from None
    except OSError as exc:
        os.close(fd)
        raise JournalError(f"cannot lock {lock_path}: {exc}") from exc
    # Who holds it, for the next opener's error message (informative only: the lock decides).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()}\n".encode(), 0)
    return fd


def _release_writer_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


class Journal:
    """The SQLite journal; build it with ``Journal.open`` and use it as a context manager."""

    def __init__(
        self, connection: sqlite3.Connection, path: Path, lock_fd: int | None = None
    ) -> None:
        self._conn = connection
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: Path, *, create: bool = True, exclusive: bool = False) -> Journal:
        """Open (and with ``create``, create or migrate) the journal at ``path``.

        Args:
            exclusive: take the writer lock (``<path>.lock``) first; the daemon does.

        Raises:
            JournalLockedError: ``exclusive`` and another process holds the writer lock.
            JournalError: the file is missing (``create=False``), not a factkeeper journal,
                from a newer factkeeper, or WAL / synchronous=FULL could not be set.
        """
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise JournalError(
                f"SQLite {sqlite3.sqlite_version} is too old; the journal needs 3.37+"
            )
        if not path.exists():
            if not create:
                raise JournalError(f"no journal at {path}; `factkeeper run` creates it")
            path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_writer_lock(path) if exclusive else None
        try:
            connection = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            _release_writer_lock(lock_fd)
            raise JournalError(f"cannot open the journal at {path}: {exc}") from exc
        journal = cls(connection, path, lock_fd)
        try:
            journal._configure()
            journal._migrate()
        except sqlite3.DatabaseError as exc:
            journal.close()
            raise JournalError(f"{path} is not a usable journal: {exc}") from exc
        except JournalError:
            journal.close()
            raise
        return journal

    def close(self) -> None:
        """Close the connection and release the writer lock; safe to call twice."""
        self._conn.close()
        _release_writer_lock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------------

    def record_batch(self, rows: Sequence[EventRecord]) -> list[int]:
        """Journal a batch of records in ONE transaction: all rows become durable, or none.

        An applied row supersedes the live correction of its fact in the same transaction, so
        no crash leaves two live corrections of one fact.

        Returns:
            The sequence numbers of the rows, in order.

        Raises:
            DuplicateEventError: a row would claim an id that is already claimed (in the
                journal or earlier in the batch).
            DuplicateOffsetError: a (topic, partition, offset) is already journaled.
            JournalError: a ``duplicate`` row names an id nothing claims, or SQLite failed.
        """
        claims = Counter(r.event_id for r in rows if r.status not in UNCLAIMED_STATUSES)
        positions = Counter((r.topic, r.partition, r.offset) for r in rows)
        with self._write("record_batch"):
            taken = {i for i, n in claims.items() if i and (n > 1 or self._claimed(i))}
            if taken:
                raise DuplicateEventError(sorted(taken))
            seen = {p for p, n in positions.items() if n > 1 or self._journaled(*p)}
            if seen:
                raise DuplicateOffsetError(sorted(seen))
            seqs = []
            for row in rows:
                if row.status == "duplicate" and not self._claimed(row.event_id or ""):
                    raise JournalError(
                        f"record {row.topic}[{row.partition}]@{row.offset} is journaled as a "
                        f"duplicate of {row.event_id!r}, but no row claims that id"
                    )
                seqs.append(self._insert(row))
            _relink(self._conn, (r.event.subject for r in rows if r.status == "applied"))
        return seqs

    def mark(self, event_ids: Sequence[str], status: EventStatus, reason: str | None) -> int:
        """Set the status (and reason) of claimed events, all in one transaction.

        Raises:
            UnknownEventError: some id has no claiming row; nothing is changed.
            ValueError: ``status`` is ``invalid`` or ``duplicate`` (arrival-only outcomes).
        """
        return self.mark_many(dict.fromkeys(event_ids, (status, reason)))

    def mark_many(self, changes: Mapping[str, tuple[EventStatus, str | None]]) -> int:
        """Set several events' status and reason in one transaction (rollback, roll forward).

        The facts of the changed events are linked again in the same transaction: when the live
        correction leaves the applied set, the newest applied one before it is live again.

        Raises:
            UnknownEventError: some id has no claiming row; nothing is changed.
            ValueError: a status is ``invalid`` or ``duplicate``.
        """
        bad = sorted({status for status, _ in changes.values()} - MARK_STATUSES)
        if bad:
            raise ValueError(f"mark sets one of {sorted(MARK_STATUSES)}, not {bad}")
        with self._write("mark_many"):
            missing = sorted(i for i in changes if not self._claimed(i))
            if missing:
                raise UnknownEventError(missing)
            for event_id, (status, reason) in changes.items():
                self._conn.execute(
                    f"UPDATE events SET status = ?, reason = ? "
                    f"WHERE event_id = ? AND status NOT IN ({_UNCLAIMED_SQL})",
                    (status, reason, event_id),
                )
            _relink(self._conn, self._subjects(changes))
        return len(changes)

    def set_batch_ids(self, changes: Mapping[str, str | None]) -> int:
        """Move claimed events to other replay units (a revert splitting a batch), atomically.

        Raises:
            UnknownEventError: some id has no claiming row; nothing is changed.
        """
        with self._write("set_batch_ids"):
            missing = sorted(i for i in changes if not self._claimed(i))
            if missing:
                raise UnknownEventError(missing)
            for event_id, batch_id in changes.items():
                self._conn.execute(
                    f"UPDATE events SET batch_id = ? "
                    f"WHERE event_id = ? AND status NOT IN ({_UNCLAIMED_SQL})",
                    (batch_id, event_id),
                )
        return len(changes)

    def assign_model_version(self, version: str, up_to_seq: int) -> int:
        """Record the snapshot version that now contains the applied edits up to ``up_to_seq``.

        Returns:
            How many applied rows without a version got this one.
        """
        with self._write("assign_model_version"):
            cursor = self._conn.execute(
                "UPDATE events SET model_version = ? "
                "WHERE status = 'applied' AND model_version IS NULL AND seq <= ?",
                (version, up_to_seq),
            )
        return cursor.rowcount

    def record_control(
        self,
        command: ControlCommand,
        *,
        received_at: datetime,
        outcome: str,
        source: str | None = None,
    ) -> int:
        """Journal a control command with its outcome; returns its sequence number.

        Args:
            command: the validated command.
            received_at: aware datetime.
            outcome: what the daemon did, e.g. ``done``, ``refused: unauthenticated``.
            source: where it came from, e.g. ``factkeeper.control[0]@12`` or ``http``.
        """
        with self._write("record_control"):
            cursor = self._conn.execute(
                "INSERT INTO control_commands (command, received_at, outcome, source) "
                "VALUES (?, ?, ?, ?)",
                (encode_control(command).decode("utf-8"), _stamp(received_at), outcome, source),
            )
        return _rowid(cursor)

    def remember_nonce(
        self, nonce: str, key_id: str, issued_at: float, forget_before: float
    ) -> bool:
        """Record a control record's nonce; False if it was seen before (a replay).

        Nonces issued before ``forget_before`` are dropped: records that old are refused as
        stale anyway.
        """
        with self._write("remember_nonce"):
            self._conn.execute("DELETE FROM control_nonces WHERE issued_at < ?", (forget_before,))
            cursor = self._conn.execute(
                "INSERT OR IGNORE INTO control_nonces (nonce, key_id, issued_at) VALUES (?, ?, ?)",
                (nonce, key_id, issued_at),
            )
        return cursor.rowcount == 1

    # -- reads ---------------------------------------------------------------------------------

    def has_event(self, event_id: str) -> bool:
        """Whether a row claims ``event_id`` (applied, failed, rolled back, ...)."""
        return self._claimed(event_id)

    def get(self, event_id: str) -> JournalEntry | None:
        """The row that claims ``event_id``, or ``None``."""
        row = self._conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events "
            f"WHERE event_id = ? AND status NOT IN ({_UNCLAIMED_SQL})",
            (event_id,),
        ).fetchone()
        return _entry(row) if row else None

    def applied_events(self, after_seq: int = 0) -> list[JournalEntry]:
        """Applied events with ``seq > after_seq``, in seq order: the deterministic replay."""
        rows = self._conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'applied' AND seq > ? "
            "ORDER BY seq",
            (after_seq,),
        ).fetchall()
        return [_entry(row) for row in rows]

    def live_events(self) -> list[JournalEntry]:
        """The live set: applied corrections no newer one of the same fact superseded, in seq
        order (at most one per fact; ``daemon.records.live_set``)."""
        rows = self._conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events "
            "WHERE status = 'applied' AND superseded_by IS NULL ORDER BY seq"
        ).fetchall()
        return [_entry(row) for row in rows]

    def fact_chain(self, event: FactCorrection) -> list[JournalEntry]:
        """The applied corrections of ``event``'s fact since the last one that restored the
        original answer, in seq order: the chain a new correction of the fact extends."""
        chain: list[JournalEntry] = []
        for entry in self._fact_entries(event.subject, fact_key(event)):
            chain = [] if entry.restores_original else [*chain, entry]
        return chain

    def awaiting_removal(self) -> dict[str, list[str]]:
        """Per applied correction that restores the original answer, the applied edits of its
        fact journaled before it (in seq order): what ``History.remove_restored`` reverts."""
        rows = self._conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events "
            "WHERE status = 'applied' AND superseded_by = event_id ORDER BY seq"
        ).fetchall()
        pending: dict[str, list[str]] = {}
        for restoring in map(_entry, rows):
            event = restoring.event
            assert event is not None and restoring.event_id is not None  # an applied row
            edits = [
                e.event_id
                for e in self._fact_entries(event.subject, fact_key(event))
                if e.seq < restoring.seq and not e.restores_original and e.event_id
            ]
            if edits:
                pending[restoring.event_id] = edits
        return pending

    def superseded_count(self) -> int:
        """Applied corrections a newer one of the same fact superseded (counted in
        ``applied`` too: their edits are still in the weights' history)."""
        row = self._conn.execute(
            "SELECT COUNT(*) FROM events WHERE status = 'applied' "
            "AND superseded_by IS NOT NULL AND superseded_by != event_id"
        ).fetchone()
        return int(row[0])

    def applied_lineage(
        self, upto_seq: int | None = None
    ) -> list[tuple[str, str | None, str | None]]:
        """``(event_id, batch_id, delta_sha256)`` of every applied event (up to ``upto_seq``),
        in seq order: what the weights hold, without parsing payloads
        (``daemon.records.unit_deltas``)."""
        rows = self._conn.execute(
            "SELECT event_id, batch_id, delta_sha256 FROM events "
            "WHERE status = 'applied' AND seq <= ? ORDER BY seq",
            (upto_seq if upto_seq is not None else 2**62,),
        ).fetchall()
        return [(event_id, batch_id, digest) for event_id, batch_id, digest in rows]

    def applied_count_since(self, moment: datetime | None) -> int:
        """Edits applied after ``moment`` (all of them when None), whatever their status now.

        The audit schedule counts edits since the last audit from here, so the count survives
        a restart; a later rollback or revert does not undo that the edit was made.
        """
        rows = self._conn.execute(
            "SELECT COUNT(*) FROM events WHERE applied_at IS NOT NULL AND applied_at > ?",
            (_stamp(moment) if moment is not None else "",),
        )
        return int(rows.fetchone()[0])

    def set_delta_sha256(self, batch_id: str, digest: str) -> int:
        """Record a unit's new weight-change hash after a deliberate recomputation (a revert
        replays later edits on other weights); returns the rows updated."""
        with self._write("set_delta_sha256"):
            cursor = self._conn.execute(
                "UPDATE events SET delta_sha256 = ? WHERE batch_id = ? AND status = 'applied'",
                (digest, batch_id),
            )
        return cursor.rowcount

    def counts_by_status(self) -> dict[EventStatus, int]:
        """Rows per status, every status present (zero when none)."""
        counts = dict.fromkeys(STATUSES, 0)
        for status, count in self._conn.execute(
            "SELECT status, COUNT(*) FROM events GROUP BY status"
        ):
            counts[status] = count
        return counts

    def last_offsets(self) -> dict[tuple[str, int], int]:
        """The highest journaled offset per (topic, partition); commit ``offset + 1``."""
        rows = self._conn.execute(
            'SELECT topic, "partition", MAX("offset") FROM events GROUP BY topic, "partition"'
        )
        return {(topic, partition): offset for topic, partition, offset in rows}

    def event_at(self, topic: str, partition: int, offset: int) -> JournalEntry | None:
        """The row journaled for one Kafka position, or ``None``."""
        row = self._conn.execute(
            f'SELECT {_EVENT_COLUMNS} FROM events WHERE topic = ? AND "partition" = ? '
            'AND "offset" = ?',
            (topic, partition, offset),
        ).fetchone()
        return _entry(row) if row else None

    def retire_partition(self, topic: str, partition: int, suffix: str) -> int:
        """Move a partition's rows under ``topic~suffix``: the topic was re-created.

        The rows, their statuses and claimed ids stay (a re-sent id is still a duplicate);
        only their (topic, partition, offset) no longer matches the new topic's records.
        """
        with self._write("retire_partition"):
            cursor = self._conn.execute(
                'UPDATE events SET topic = ? WHERE topic = ? AND "partition" = ?',
                (f"{topic}~{suffix}", topic, partition),
            )
        return cursor.rowcount

    def is_empty(self) -> bool:
        """No event and no control command was ever journaled."""
        row = self._conn.execute(
            "SELECT (SELECT COUNT(*) FROM events) + (SELECT COUNT(*) FROM control_commands)"
        ).fetchone()
        return row[0] == 0

    def control_offsets(self) -> dict[tuple[str, int], int]:
        """The highest journaled control-topic offset per (topic, partition).

        Read off the ``source`` of commands that came from Kafka (``control_source``); the
        consumer skips redelivered control records at or below it.
        """
        offsets: dict[tuple[str, int], int] = {}
        for (source,) in self._conn.execute("SELECT source FROM control_commands"):
            match = _CONTROL_SOURCE.fullmatch(source or "")
            if match:
                key = (match["topic"], int(match["partition"]))
                offsets[key] = max(offsets.get(key, -1), int(match["offset"]))
        return offsets

    def last_seq(self) -> int:
        """The newest event sequence number (0 when empty); snapshots record it."""
        return self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def control_commands(self, after_seq: int = 0) -> list[ControlEntry]:
        """Journaled control commands with ``seq > after_seq``, in order."""
        rows = self._conn.execute(
            "SELECT seq, command, received_at, outcome, source FROM control_commands "
            "WHERE seq > ? ORDER BY seq",
            (after_seq,),
        ).fetchall()
        return [
            ControlEntry(
                seq=seq,
                command=_CONTROL_ADAPTER.validate_json(command, strict=True),
                received_at=datetime.fromisoformat(received_at),
                outcome=outcome,
                source=source,
            )
            for seq, command, received_at, outcome, source in rows
        ]

    def paused(self) -> bool:
        """Whether the newest ``pause``/``resume`` that was carried out is a pause: a paused
        daemon stays paused across a restart until someone resumes it."""
        row = self._conn.execute(
            "SELECT json_extract(command, '$.command') FROM control_commands "
            "WHERE json_extract(command, '$.command') IN ('pause', 'resume') "
            "AND outcome = 'done' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return row is not None and row[0] == "pause"

    def pragma(self, name: Pragma) -> Any:
        """The current value of a pragma, for checks and ``factkeeper status``."""
        if name not in get_args(Pragma):
            raise ValueError(f"not a journal pragma: {name!r}")
        return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    # -- internals -----------------------------------------------------------------------------

    def _configure(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(
                f"{self.path}: WAL mode unavailable (got {mode!r}); use a local disk"
            )
        self._conn.execute("PRAGMA synchronous=FULL")
        if self._conn.execute("PRAGMA synchronous").fetchone()[0] != 2:
            raise JournalError(f"{self.path}: could not set synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")

    def _migrate(self) -> None:
        app_id = int(self.pragma("application_id"))
        version = int(self.pragma("user_version"))
        tables = self._conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()[0]
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            raise JournalError(f"{self.path} is an SQLite file but not a factkeeper journal")
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.path} has journal schema {version}; this factkeeper reads up to "
                f"{SCHEMA_VERSION}. Upgrade factkeeper."
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._write(f"migration to schema {target}"):
                if int(self.pragma("user_version")) >= target:
                    continue  # another process (daemon, `status`) migrated it since we looked
                for step in _MIGRATIONS[target - 1]:
                    if callable(step):
                        step(self._conn)
                    else:
                        self._conn.execute(step)
                self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self._conn.execute(f"PRAGMA user_version = {target}")
            log.info("journal %s migrated to schema %d", self.path, target)

    @contextmanager
    def _write(self, action: str) -> Iterator[None]:
        """One write transaction; rolled back on any error, SQLite errors become JournalError."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise JournalError(f"journal {action} failed: {exc}") from exc

    def _claimed(self, event_id: str) -> bool:
        row = self._conn.execute(
            f"SELECT 1 FROM events WHERE event_id = ? AND status NOT IN ({_UNCLAIMED_SQL})",
            (event_id,),
        ).fetchone()
        return row is not None

    def _fact_entries(self, subject: str, key: str) -> list[JournalEntry]:
        """The applied rows of one fact (``fact_key``), in seq order."""
        rows = self._conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'applied' "
            "AND json_extract(payload, '$.subject') = ? ORDER BY seq",
            (subject,),
        ).fetchall()
        entries = (_entry(row) for row in rows)
        return [e for e in entries if e.event is not None and fact_key(e.event) == key]

    def _subjects(self, event_ids: Iterable[str]) -> set[str]:
        """The subjects of claimed events (to link their facts again)."""
        subjects = set()
        for event_id in event_ids:
            row = self._conn.execute(
                "SELECT json_extract(payload, '$.subject') FROM events "
                f"WHERE event_id = ? AND status NOT IN ({_UNCLAIMED_SQL})",
                (event_id,),
            ).fetchone()
            if row is not None and row[0] is not None:
                subjects.add(row[0])
        return subjects

    def _journaled(self, topic: str, partition: int, offset: int) -> bool:
        row = self._conn.execute(
            'SELECT 1 FROM events WHERE topic = ? AND "partition" = ? AND "offset" = ?',
            (topic, partition, offset),
        ).fetchone()
        return row is not None

    def _insert(self, row: EventRecord) -> int:
        cursor = self._conn.execute(
            'INSERT INTO events (event_id, topic, "partition", "offset", status, reason, '
            "payload, received_at, applied_at, edit_seconds, delta_norms, model_version, "
            "batch_id, delta_sha256, retry_rung, superseded_by, material_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.event_id,
                row.topic,
                row.partition,
                row.offset,
                row.status,
                row.reason,
                encode_event(row.event).decode("utf-8") if row.event is not None else None,
                _stamp(row.received_at),
                _stamp(row.applied_at) if row.applied_at is not None else None,
                row.edit_seconds,
                json.dumps(dict(row.delta_norms)) if row.delta_norms is not None else None,
                row.model_version,
                row.batch_id,
                row.delta_sha256,
                row.retry_rung,
                row.event_id if row.restores_original else None,
                row.material_sha256,
            ),
        )
        return _rowid(cursor)


_CONTROL_SOURCE = re.compile(r"(?P<topic>[A-Za-z0-9._-]+)\[(?P<partition>\d+)\]@(?P<offset>\d+)")


def control_source(topic: str, partition: int, offset: int) -> str:
    """How a control record's position is journaled as its ``source``: ``topic[p]@offset``."""
    return f"{topic}[{partition}]@{offset}"


def _stamp(moment: datetime) -> str:
    """UTC ISO-8601, so stored times sort and compare as text."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC).isoformat()


def _rowid(cursor: sqlite3.Cursor) -> int:
    if cursor.lastrowid is None:
        raise JournalError("SQLite returned no row id for an insert")
    return cursor.lastrowid


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    (seq, event_id, topic, partition, offset, status, reason, payload, received_at) = row[:9]
    (applied_at, edit_seconds, delta_norms, model_version, batch_id, delta_sha256) = row[9:15]
    retry_rung, superseded_by, material_sha256 = row[15:18]
    return JournalEntry(
        seq=seq,
        event_id=event_id,
        topic=topic,
        partition=partition,
        offset=offset,
        status=status,
        reason=reason,
        event=stored_event(payload) if payload else None,
        received_at=datetime.fromisoformat(received_at),
        applied_at=datetime.fromisoformat(applied_at) if applied_at else None,
        edit_seconds=edit_seconds,
        delta_norms=json.loads(delta_norms) if delta_norms else None,
        model_version=model_version,
        batch_id=batch_id,
        delta_sha256=delta_sha256,
        retry_rung=retry_rung,
        superseded_by=superseded_by,
        material_sha256=material_sha256,
    )
