"""The journal on real SQLite files: durability pragmas, atomic batches, replay order."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.control.commands import Revert, Rollback
from daemon.errors import (
    DuplicateEventError,
    DuplicateOffsetError,
    JournalError,
    JournalLockedError,
    UnknownEventError,
)
from daemon.records.journal import SCHEMA_VERSION, EventRecord, Journal, writer_lock_path
from tests.daemon.builders import make_event

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
TOPIC = "fact-corrections"


def applied(event_id: str, offset: int, partition: int = 0, **extra: object) -> EventRecord:
    return EventRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        status="applied",
        received_at=T0 + timedelta(seconds=offset),
        applied_at=T0 + timedelta(seconds=offset, milliseconds=500),
        event=make_event(event_id),
        **extra,  # type: ignore[arg-type]
    )


def invalid(offset: int, partition: int = 0) -> EventRecord:
    return EventRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        status="invalid",
        received_at=T0,
        reason="invalid-json",
    )


def duplicate(event_id: str, offset: int) -> EventRecord:
    return EventRecord(
        topic=TOPIC,
        partition=0,
        offset=offset,
        status="duplicate",
        received_at=T0,
        event=make_event(event_id),
        reason="same payload",
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal.open(tmp_path / "state" / "journal.sqlite3") as opened:
        yield opened


def test_wal_and_full_fsync_are_set(journal: Journal) -> None:
    assert journal.pragma("journal_mode") == "wal"
    assert journal.pragma("synchronous") == 2  # FULL
    assert journal.pragma("user_version") == SCHEMA_VERSION
    with sqlite3.connect(journal.path) as other:  # WAL is a property of the file
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_recorded_event_reads_back_whole(journal: Journal) -> None:
    row = applied("cf:1", 0, edit_seconds=1.25, delta_norms={"model.layers.3.mlp": 0.5})
    (seq,) = journal.record_batch([row])
    entry = journal.get("cf:1")
    assert entry is not None
    assert entry.seq == seq
    assert entry.event == row.event
    assert entry.status == "applied"
    assert (entry.topic, entry.partition, entry.offset) == (TOPIC, 0, 0)
    assert entry.received_at == row.received_at
    assert entry.applied_at == row.applied_at
    assert entry.edit_seconds == 1.25
    assert entry.delta_norms == {"model.layers.3.mlp": 0.5}
    assert journal.has_event("cf:1")
    assert not journal.has_event("cf:2")
    assert journal.get("cf:2") is None


def test_duplicate_id_inside_a_batch_writes_nothing(journal: Journal) -> None:
    batch = [applied("a", 0), applied("b", 1), applied("a", 2)]
    with pytest.raises(DuplicateEventError) as caught:
        journal.record_batch(batch)
    assert caught.value.event_ids == ("a",)
    assert sum(journal.counts_by_status().values()) == 0
    assert journal.last_offsets() == {}


def test_error_after_inserts_rolls_the_whole_batch_back(journal: Journal) -> None:
    # The third row fails only after the first two were inserted in the open transaction.
    with pytest.raises(JournalError, match="no row claims"):
        journal.record_batch([applied("a", 0), applied("b", 1), duplicate("zzz", 2)])
    assert sum(journal.counts_by_status().values()) == 0
    assert not journal.has_event("a")


def test_an_id_is_claimed_once_across_batches(journal: Journal) -> None:
    journal.record_batch([applied("a", 0)])
    with pytest.raises(DuplicateEventError):
        journal.record_batch([applied("b", 1), applied("a", 2)])
    assert not journal.has_event("b")
    journal.record_batch([duplicate("a", 2), invalid(3)])
    counts = journal.counts_by_status()
    assert (counts["applied"], counts["duplicate"], counts["invalid"]) == (1, 1, 1)
    assert journal.get("a").offset == 0  # type: ignore[union-attr]


def test_each_kafka_record_is_journaled_once(journal: Journal) -> None:
    journal.record_batch([applied("a", 5)])
    with pytest.raises(DuplicateOffsetError) as caught:
        journal.record_batch([applied("b", 5)])
    assert caught.value.positions == ((TOPIC, 0, 5),)
    with pytest.raises(DuplicateOffsetError):
        journal.record_batch([invalid(6), invalid(6)])
    journal.record_batch([applied("b", 5, partition=1)])


def test_replay_is_in_seq_order_and_skips_non_applied(journal: Journal) -> None:
    journal.record_batch([applied("e1", 0), invalid(1), applied("e2", 2, partition=1)])
    journal.record_batch([applied("e3", 3), applied("e4", 4)])
    journal.mark(["e3"], "rolled_back", "audit gate failed")
    replay = journal.applied_events()
    assert [entry.event_id for entry in replay] == ["e1", "e2", "e4"]
    assert [entry.seq for entry in replay] == sorted(entry.seq for entry in replay)
    after = replay[1].seq
    assert [entry.event_id for entry in journal.applied_events(after_seq=after)] == ["e4"]


def test_reopen_after_close_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    with Journal.open(path) as journal:
        journal.record_batch([applied("a", 0), applied("b", 1)])
        journal.record_control(
            Rollback(command="rollback", version=3), received_at=T0, outcome="done"
        )
    with Journal.open(path, create=False) as journal:
        assert [e.event_id for e in journal.applied_events()] == ["a", "b"]
        assert journal.last_seq() == 2
        assert journal.pragma("user_version") == SCHEMA_VERSION
        assert journal.pragma("synchronous") == 2
        (control,) = journal.control_commands()
        assert control.command == Rollback(command="rollback", version=3)
        journal.record_batch([applied("c", 2)])
        assert journal.last_seq() == 3


def test_last_offsets_cover_every_journaled_record(journal: Journal) -> None:
    journal.record_batch([applied("a", 0), applied("b", 7), invalid(9)])
    journal.record_batch([applied("c", 4, partition=2), duplicate("a", 10)])
    other = EventRecord(
        topic="other", partition=0, offset=3, status="invalid", received_at=T0, reason="too-large"
    )
    journal.record_batch([other])
    assert journal.last_offsets() == {(TOPIC, 0): 10, (TOPIC, 2): 4, ("other", 0): 3}


def test_mark_is_all_or_nothing(journal: Journal) -> None:
    journal.record_batch([applied("a", 0), applied("b", 1)])
    with pytest.raises(UnknownEventError) as caught:
        journal.mark(["a", "ghost"], "reverted", "revert command")
    assert caught.value.event_ids == ("ghost",)
    assert journal.get("a").status == "applied"  # type: ignore[union-attr]
    assert journal.mark(["a", "b"], "quarantined", "locality gate") == 2
    entry = journal.get("b")
    assert entry is not None and (entry.status, entry.reason) == ("quarantined", "locality gate")
    with pytest.raises(ValueError, match="mark sets one of"):
        journal.mark(["a"], "duplicate", None)


def test_counts_by_status_lists_every_status(journal: Journal) -> None:
    failed = EventRecord(
        topic=TOPIC,
        partition=0,
        offset=2,
        status="failed",
        received_at=T0,
        event=make_event("f"),
        reason="edit-failed",
    )
    journal.record_batch([applied("a", 0), invalid(1), failed])
    counts = journal.counts_by_status()
    assert counts == {
        "applied": 1,
        "failed": 1,
        "invalid": 1,
        "duplicate": 0,
        "rolled_back": 0,
        "quarantined": 0,
        "reverted": 0,
    }


def test_model_version_is_assigned_up_to_a_seq(journal: Journal) -> None:
    seqs = journal.record_batch([applied("a", 0), applied("b", 1), applied("c", 2)])
    assert journal.assign_model_version("4", up_to_seq=seqs[1]) == 2
    assert [e.model_version for e in journal.applied_events()] == ["4", "4", None]


def test_control_commands_are_journaled_in_order(journal: Journal) -> None:
    journal.record_control(
        Revert(command="revert", event_id="cf:1"),
        received_at=T0,
        outcome="done",
        source="factkeeper.control[0]@4",
    )
    journal.record_control(
        Rollback(command="rollback", version=2), received_at=T0, outcome="refused: unknown version"
    )
    first, second = journal.control_commands()
    assert first.seq < second.seq
    assert first.command == Revert(command="revert", event_id="cf:1")
    assert first.source == "factkeeper.control[0]@4"
    assert second.outcome == "refused: unknown version"
    assert [c.seq for c in journal.control_commands(after_seq=first.seq)] == [second.seq]


def test_open_without_create_needs_an_existing_journal(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="factkeeper run"):
        Journal.open(tmp_path / "missing.sqlite3", create=False)
    assert not (tmp_path / "missing.sqlite3").exists()


def test_other_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(JournalError, match="not a factkeeper journal"):
        Journal.open(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database at all" * 50)
    with pytest.raises(JournalError, match="not a usable journal"):
        Journal.open(text)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    Journal.open(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="Upgrade factkeeper"):
        Journal.open(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"status": "invalid", "event": "event", "reason": "x"}, "invalid record has no event"),
        ({"status": "applied", "event": None}, "invalid record has no event"),
        ({"status": "failed", "event": "event"}, "needs a reason"),
        ({"status": "applied", "event": "event"}, "needs applied_at"),
        ({"status": "reverted", "event": "event"}, "arrives as one of"),
        ({"status": "invalid", "reason": "x", "received_at": datetime(2026, 1, 1)}, "aware"),
    ],
)
def test_records_are_checked_when_built(fields: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "topic": TOPIC,
        "partition": 0,
        "offset": 0,
        "received_at": T0,
        **fields,
    }
    if values.get("event") == "event":
        values["event"] = make_event()
    with pytest.raises(ValueError, match=message):
        EventRecord(**values)  # type: ignore[arg-type]


def test_two_openers_of_a_new_journal_do_not_both_migrate(tmp_path):
    """A daemon and `factkeeper status` may open a fresh journal at the same moment."""
    path = tmp_path / "journal.sqlite3"
    first = Journal.open(path)
    first.close()
    # The second opener read user_version 0 just before the first one migrated the file.
    second = Journal(sqlite3.connect(path, isolation_level=None), path)
    real_pragma = second.pragma
    stale_reads = iter([0])

    def pragma(name):
        stale = next(stale_reads, None) if name == "user_version" else None
        return real_pragma(name) if stale is None else stale

    second.pragma = pragma
    second._migrate()  # must not raise "table events already exists"
    assert second.last_seq() == 0
    second.close()


def test_rows_are_read_back_without_input_limits(journal: Journal) -> None:
    # Rows an older factkeeper journaled past today's limits: a source that NFC made 258
    # characters long, and a zero-width space. Reading must not re-apply the limits, or every
    # snapshot, audit and restart after such a row raises (issue 17, item 4).
    journal.record_batch([applied("cf:1", 0), applied("cf:2", 1)])
    long_source = "a" * 250 + "\u0915\u093c" * 4
    with sqlite3.connect(journal.path) as raw:
        for event_id, field, value in (
            ("cf:1", "$.source", long_source),
            ("cf:2", "$.target_new", "Eng\u200blish"),
        ):
            raw.execute(
                "UPDATE events SET payload = json_set(payload, ?, ?) WHERE event_id = ?",
                (field, value, event_id),
            )
    first, second = journal.applied_events()
    assert first.event is not None and first.event.source == long_source
    assert second.event is not None and second.event.target_new == "Eng\u200blish"
    assert journal.get("cf:1") is not None


# --- the writer lock: one daemon per journal --------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from daemon.records.journal import Journal
journal = Journal.open(Path(sys.argv[1]), exclusive=True)
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock_in_another_process(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_process_fails_with_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    holder = _hold_lock_in_another_process(path)
    try:
        with pytest.raises(JournalLockedError) as caught:
            Journal.open(path, exclusive=True)
        assert f"pid={holder.pid}" in caught.value.holder
        assert caught.value.lock_path == str(writer_lock_path(path))
        assert "one daemon per journal" in str(caught.value)
        with Journal.open(path, create=False) as reader:  # status/report still read
            assert reader.last_seq() == 0
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, no stale lock file blocks
        holder.wait(timeout=30)
    with Journal.open(path, exclusive=True) as journal:
        assert journal.last_seq() == 0


def test_the_writer_lock_holds_within_one_process_until_close(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    first = Journal.open(path, exclusive=True)
    with pytest.raises(JournalLockedError):
        Journal.open(path, exclusive=True)
    first.close()
    second = Journal.open(path, exclusive=True)
    first.close()  # twice is fine and does not release the new holder's lock
    with pytest.raises(JournalLockedError):
        Journal.open(path, exclusive=True)
    second.close()


def test_a_failed_open_releases_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    path.write_text("not a journal, just text " * 100)
    with pytest.raises(JournalError):
        Journal.open(path, exclusive=True)
    path.unlink()
    Journal.open(path, exclusive=True).close()
