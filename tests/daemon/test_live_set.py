"""The live set: the newest applied correction of each fact, older ones ``superseded_by`` it.

On real journal files: links are set when the newer correction is journaled, follow every
status change (rollback, revert, quarantine, roll forward), and an older journal is linked when
it is migrated.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon.audits.runner import AuditRunner
from daemon.config import load_settings
from daemon.ingest.events import encode_event
from daemon.ingest.restores import restores_original, same_answer
from daemon.records import journal as journal_module
from daemon.records.journal import SCHEMA_VERSION, EventRecord, Journal
from daemon.records.live_set import fact_key
from daemon.status import daemon_status
from monitoring.metrics import FactkeeperMetrics
from tests.daemon.builders import make_event
from tests.daemon.test_audit_on_failure import FAILING, FakeHistory, FakeVersions
from tests.daemon.test_journal import T0, TOPIC

PROMPT = "The mother tongue of Danielle Darrieux is"


def correction(event_id: str, offset: int, **fields: object) -> EventRecord:
    """An applied correction of the Danielle Darrieux fact unless ``fields`` say otherwise."""
    return EventRecord(
        topic=TOPIC,
        partition=0,
        offset=offset,
        status="applied",
        received_at=T0 + timedelta(seconds=offset),
        applied_at=T0 + timedelta(seconds=offset),
        event=make_event(event_id, **fields),
    )


def links(journal: Journal, *event_ids: str) -> list[str | None]:
    return [journal.get(i).superseded_by for i in event_ids]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal.open(tmp_path / "journal.sqlite3") as opened:
        yield opened


def test_a_fact_is_its_subject_and_its_prompt_as_a_reader_compares_it() -> None:
    key = fact_key(make_event(prompt=PROMPT))
    same = [
        "the mother tongue of Danielle Darrieux is",
        "The  mother\ttongue of Danielle Darrieux is:",
        "THE MOTHER TONGUE OF Danielle Darrieux IS ...",
    ]
    for prompt in same:
        assert fact_key(make_event(prompt=prompt)) == key, prompt
    assert fact_key(make_event(prompt="The mother tongue of Danielle Darrieux was")) != key
    other_subject = make_event(subject="Danielle", prompt=PROMPT)
    assert fact_key(other_subject) != key
    composed, decomposed = "Am\u00e9lie", "Ame\u0301lie"
    first = make_event(subject=composed, prompt=f"{composed} speaks")
    second = make_event(subject=decomposed, prompt=f"{decomposed} speaks")
    assert fact_key(first) == fact_key(second)  # the events are NFC once parsed


def test_a_fact_corrected_three_times_has_only_the_third_live(journal: Journal) -> None:
    other = correction("other", 0, subject="Paris", prompt="Paris is the capital of")
    journal.record_batch([correction("c1", 1, target_new="English"), other])
    journal.record_batch([correction("c2", 2, target_new="German")])
    journal.record_batch([correction("c3", 3, target_new="Italian")])

    assert [e.event_id for e in journal.live_events()] == ["other", "c3"]
    assert links(journal, "c1", "c2", "c3", "other") == ["c2", "c3", None, None]
    assert [e.status for e in journal.applied_events()] == ["applied"] * 4  # all still held
    assert journal.superseded_count() == 2


def test_corrections_of_one_fact_in_one_batch_link_in_journal_order(journal: Journal) -> None:
    journal.record_batch([correction("c1", 0), correction("c2", 1), correction("c3", 2)])
    assert [e.event_id for e in journal.live_events()] == ["c3"]
    assert links(journal, "c1", "c2") == ["c2", "c3"]


def test_the_newest_applied_correction_is_live_again_after_each_status_change(
    journal: Journal,
) -> None:
    for i in (1, 2, 3):
        journal.record_batch([correction(f"c{i}", i)])

    journal.mark(["c3"], "rolled_back", "rollback to v1")
    assert [e.event_id for e in journal.live_events()] == ["c2"]
    journal.mark(["c3"], "applied", "roll forward")
    assert [e.event_id for e in journal.live_events()] == ["c3"]
    assert links(journal, "c1", "c2") == ["c2", "c3"]

    journal.mark(["c2"], "reverted", "revert")  # the middle one: the first skips over it
    assert links(journal, "c1", "c3") == ["c3", None]
    journal.mark_many({"c3": ("quarantined", "audit-gate")})
    assert [e.event_id for e in journal.live_events()] == ["c1"]
    assert journal.superseded_count() == 0


def test_a_failed_correction_supersedes_nothing(journal: Journal) -> None:
    journal.record_batch([correction("c1", 0)])
    failed = EventRecord(
        topic=TOPIC,
        partition=0,
        offset=1,
        status="failed",
        received_at=T0,
        event=make_event("c2"),
        reason="edit did not take",
    )
    journal.record_batch([failed])
    assert [e.event_id for e in journal.live_events()] == ["c1"]


def test_the_migration_links_the_corrections_an_older_journal_holds(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    with sqlite3.connect(path, isolation_level=None) as conn:  # a schema-4 journal, as shipped
        for steps in journal_module._MIGRATIONS[:4]:
            for step in steps:
                conn.execute(step)
        conn.execute(f"PRAGMA application_id = {journal_module.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 4")
        rows = [
            ("c1", "Danielle Darrieux", PROMPT),
            ("c2", "Danielle Darrieux", "the mother tongue of Danielle Darrieux is"),
            ("c3", "Danielle Darrieux", PROMPT + ":"),
            ("x", "Paris", "Paris is the capital of"),
        ]
        for offset, (event_id, subject, prompt) in enumerate(rows):
            event = make_event(event_id, subject=subject, prompt=prompt)
            conn.execute(
                'INSERT INTO events (event_id, topic, "partition", "offset", status, payload, '
                "received_at, applied_at) VALUES (?, ?, 0, ?, 'applied', ?, ?, ?)",
                (event_id, TOPIC, offset, encode_event(event).decode(), T0.isoformat(), None),
            )
    conn.close()

    with Journal.open(path) as journal:
        assert journal.pragma("user_version") == SCHEMA_VERSION
        assert [e.event_id for e in journal.live_events()] == ["c3", "x"]
        assert links(journal, "c1", "c2") == ["c2", "c3"]
        journal.record_batch([correction("c4", 9)])
        assert [e.event_id for e in journal.live_events()] == ["x", "c4"]


def test_status_counts_superseded_corrections_beside_the_statuses(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing answers on: the daemon is not running
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"FACTKEEPER_HOME": str(tmp_path), "FACTKEEPER_METRICS__PORT": str(port)}
    settings = load_settings(None, env=env)
    with Journal.open(settings.journal.path) as journal:
        journal.record_batch([correction("c1", 0), correction("c2", 1), correction("c3", 2)])
    report = daemon_status(settings, timeout_s=0.5)
    assert report["events"]["applied"] == 3
    assert report["superseded"] == 2


def test_the_audit_checks_only_the_live_correction_of_a_fact(tmp_path: Path) -> None:
    settings = load_settings(None, env={"FACTKEEPER_HOME": str(tmp_path)})
    seen = []

    def run(facts, resume_layer=0):
        seen.extend(facts)
        return FAILING

    with Journal.open(tmp_path / "journal.sqlite3") as journal:
        for i, target in enumerate(["English", "German", "Italian"], start=1):
            journal.record_batch([correction(f"c{i}", i, target_new=target)])
        runner = AuditRunner(
            settings,
            SimpleNamespace(run=run),  # type: ignore[arg-type]
            journal,
            FakeVersions(),  # type: ignore[arg-type]
            FakeHistory(),  # type: ignore[arg-type]
            FactkeeperMetrics(),
            tmp_path / "audits",
        )
        runner.resume_layer = lambda: 0  # type: ignore[method-assign]
        report = runner.run("requested", producer=None)
        assert [(f.event_id, f.target) for f in seen] == [("c3", "Italian")]
        # A failed gate still quarantines every edit production lacks, superseded ones too.
        assert set(report.quarantined_event_ids) == {"c1", "c2", "c3"}


def test_a_correction_that_restores_the_original_answer_leaves_nothing_live(
    journal: Journal,
) -> None:
    for i, target in enumerate(["English", "German"], start=1):
        journal.record_batch([correction(f"c{i}", i, target_new=target)])
    restoring = correction("r", 3, target_new="French", target_old="German")
    journal.record_batch([EventRecord(**{**restoring.__dict__, "restores_original": True})])

    assert journal.live_events() == []
    assert links(journal, "c1", "c2", "r") == ["c2", "r", "r"]
    assert journal.get("r").restores_original and not journal.get("c2").restores_original
    assert journal.awaiting_removal() == {"r": ["c1", "c2"]}
    assert journal.fact_chain(make_event("next")) == []  # restored: a new chain starts
    assert journal.superseded_count() == 2

    journal.record_batch([correction("c4", 4, target_new="Italian")])
    assert [e.event_id for e in journal.live_events()] == ["c4"]
    assert [e.event_id for e in journal.fact_chain(make_event("next"))] == ["c4"]
    journal.mark(["c1", "c2"], "reverted", "restored")
    assert journal.awaiting_removal() == {}
    assert links(journal, "r", "c4") == ["r", None]


def test_a_restoring_record_has_no_unit() -> None:
    with pytest.raises(ValueError, match="restores the original answer"):
        EventRecord(**{**correction("r", 0).__dict__, "restores_original": True, "batch_id": "b"})


def test_the_judge_decides_whether_an_answer_is_the_original_one() -> None:
    assert same_answer("French", " French ")
    assert not same_answer("French", "french")
    assert not same_answer("French", "French Creole")  # the whole answer, not a prefix
    chain = [make_event("c1", target_new="English", target_old="French"), make_event("c2")]
    assert restores_original(make_event("r", target_new="French", target_old="German"), chain)
    assert not restores_original(make_event("r", target_new="German"), chain)
    back = make_event("r", target_new="French", target_old="English")
    assert not restores_original(back, [])  # no chain
    assert not restores_original(back, [make_event("c1", target_new="English", target_old=None)])
