"""Redelivery scenarios (issue 17): a control record seen again, a topic re-created.

Both run in-process ``Daemon`` objects on the tiny model against a real broker and count, from
the journal, the two things that must never happen: a correction lost (no journal row, or taken
back by a command that already ran) and a correction applied twice (claimed by two rows).

* **control redelivered after a crash**: a ``rollback`` runs, corrections produced after it are
  applied, and the control record's offset commit is lost (the crash between executing and
  committing); after a restart the broker delivers the rollback again. Run a second time it
  would roll back the corrections applied since; it must be skipped.
* **topic re-created**: the corrections topic is deleted and created again, so new records
  reuse offsets the journal holds. The daemon must refuse to start, then with
  ``accept_journal_mismatch`` consume every new record.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from daemon.config import load_settings
from daemon.control.commands import Rollback, TakeSnapshot, encode_control
from daemon.errors import JournalMismatchError
from daemon.ingest.consumer import FactConsumer
from daemon.records.journal import Journal
from daemon.service import Daemon
from tests.daemon.builders import to_bytes
from tests.daemon.harness import config_file, create_topics, env_for, fact, journal_path, produce

IDLE_S = 3.0
#: Statuses a correction may end in without being lost (failed: the post-check refused it).
KEPT = frozenset({"applied", "failed"})


@dataclass(frozen=True)
class RedeliveryConfig:
    before: int = 4  # corrections the version holds
    rolled_back: int = 3  # corrections the rollback removes (on purpose: not lost)
    after: int = 4  # corrections applied after the rollback, before the crash
    after_restart: int = 3  # corrections consumed after the restart


@dataclass(frozen=True)
class RecreateConfig:
    before: int = 5  # corrections on the old topic
    after: int = 5  # corrections on the re-created topic (same offsets, new ids)


@dataclass
class RedeliveryResult:
    config: dict[str, Any]
    events_lost: int
    applied_twice: int
    lost_ids: list[str] = field(default_factory=list)
    control_executions: dict[str, int] = field(default_factory=dict)
    redelivered_skipped: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def failures(self) -> list[str]:
        problems = []
        if self.redelivered_skipped < 1:
            problems.append("the rollback was not redelivered: the scenario proved nothing")
        if self.events_lost:
            problems.append(f"{self.events_lost} corrections lost: {self.lost_ids[:5]}")
        if self.applied_twice:
            problems.append(f"{self.applied_twice} corrections or commands applied twice")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecreateResult:
    config: dict[str, Any]
    events_lost: int
    applied_twice: int
    refused_without_flag: bool
    lost_ids: list[str] = field(default_factory=list)
    retired_rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def failures(self) -> list[str]:
        problems = []
        if not self.refused_without_flag:
            problems.append("the daemon started on a re-created topic without the flag")
        if self.events_lost:
            problems.append(f"{self.events_lost} corrections lost: {self.lost_ids[:5]}")
        if self.applied_twice:
            problems.append(f"{self.applied_twice} corrections claimed twice")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _daemon(env: dict[str, str], **options: bool) -> Daemon:
    home = Path(env["FACTKEEPER_HOME"])
    return Daemon(load_settings(config_file(home), env=env), serve_metrics=False, **options)


def _claims(journal: Journal, ids: list[str]) -> tuple[dict[str, str], int]:
    """Status per id (missing: absent) and how many ids more than one row claims."""
    rows = journal._conn.execute(  # read-only look at every row, retired topics included
        "SELECT event_id, status FROM events WHERE status NOT IN ('invalid', 'duplicate')"
    ).fetchall()
    claims = Counter(event_id for event_id, _ in rows)
    status = {event_id: s for event_id, s in rows}
    return {i: status.get(i, "missing") for i in ids}, sum(1 for n in claims.values() if n > 1)


def run_control_redelivery(
    bootstrap: str, workdir: Path, model_dir: Path, config: RedeliveryConfig
) -> RedeliveryResult:
    topic = f"redelivery-{int(time.time() * 1000)}"
    create_topics(bootstrap, topic)
    env = env_for(
        workdir,
        bootstrap,
        topic,
        model_dir,
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
        FACTKEEPER_CONTROL__ALLOW_UNSIGNED="true",  # the scenario is about redelivery
    )
    n = 0

    def stream(count: int) -> list[str]:
        nonlocal n
        ids = list(range(n, n + count))
        n += count
        produce(bootstrap, topic, [to_bytes(fact(i)) for i in ids])
        return [f"fact:{i}" for i in ids]

    before = stream(config.before)
    daemon = _daemon(env)
    try:
        daemon.run(idle_timeout_s=IDLE_S, handle_signals=False)
        version = daemon.handle_control(TakeSnapshot(command="snapshot")).split()[-1]
        rolled_back = stream(config.rolled_back)
        daemon.run(idle_timeout_s=IDLE_S, handle_signals=False)
        rollback = Rollback(command="rollback", version=int(version.strip("()")))
        produce(bootstrap, f"{topic}.control", [encode_control(rollback)])
        after = stream(config.after)
        # The crash between executing the command and committing its offset: the commit of
        # the control record is lost, so the broker delivers it again after the restart.
        real_commit = FactConsumer._commit_offsets

        def lose_control_commits(self, offsets):
            kept = {tp: o for tp, o in offsets.items() if tp.topic != f"{topic}.control"}
            if kept:
                real_commit(self, kept)

        FactConsumer._commit_offsets = lose_control_commits
        try:
            daemon.run(idle_timeout_s=IDLE_S, handle_signals=False)
        finally:
            FactConsumer._commit_offsets = real_commit
    finally:
        daemon.close()

    after_restart = stream(config.after_restart)
    restarted = _daemon(env)
    try:
        restarted.run(idle_timeout_s=IDLE_S, handle_signals=False)
        skipped = restarted.consumer.stats.results.get("already-journaled", 0)
        kept_ids = before + after + after_restart
        status, twice = _claims(restarted.journal, kept_ids + rolled_back)
        executions = Counter(c.source for c in restarted.journal.control_commands())
        control_twice = sum(1 for k in executions.values() if k > 1)
    finally:
        restarted.close()
    lost = [i for i in kept_ids if status[i] not in KEPT]
    lost += [i for i in rolled_back if status[i] == "missing"]
    return RedeliveryResult(
        config=asdict(config),
        events_lost=len(lost),
        applied_twice=twice + control_twice,
        lost_ids=lost,
        control_executions=dict(executions),
        redelivered_skipped=skipped,
        statuses=dict(Counter(status.values())),
    )


def _recreate(bootstrap: str, topic: str, timeout_s: float = 60.0) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topic])
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                admin.create_topics([NewTopic(topic, 1, 1)])
                return
            except KafkaError:  # still being deleted
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        admin.close()


def run_topic_recreated(
    bootstrap: str, workdir: Path, model_dir: Path, config: RecreateConfig
) -> RecreateResult:
    topic = f"recreated-{int(time.time() * 1000)}"
    create_topics(bootstrap, topic)
    env = env_for(workdir, bootstrap, topic, model_dir)
    old = [f"fact:{i}" for i in range(config.before)]
    produce(bootstrap, topic, [to_bytes(fact(i)) for i in range(config.before)])
    daemon = _daemon(env)
    try:
        daemon.run(idle_timeout_s=IDLE_S, handle_signals=False)
    finally:
        daemon.close()

    _recreate(bootstrap, topic)
    span = range(config.before, config.before + config.after)
    new = [f"fact:{i}" for i in span]
    produce(bootstrap, topic, [to_bytes(fact(i)) for i in span])
    refused = False
    try:
        daemon = _daemon(env)
        try:
            daemon.run(idle_timeout_s=IDLE_S, handle_signals=False)
        finally:
            daemon.close()
    except JournalMismatchError:
        refused = True

    daemon = _daemon(env, accept_journal_mismatch=True)
    try:
        daemon.run(idle_timeout_s=IDLE_S, handle_signals=False)
    finally:
        daemon.close()
    with Journal.open(journal_path(env), create=False) as journal:
        status, twice = _claims(journal, old + new)
        retired = journal._conn.execute(
            "SELECT COUNT(*) FROM events WHERE topic LIKE ?", (f"{topic}~retired-%",)
        ).fetchone()[0]
    lost = [i for i in old + new if status[i] not in KEPT]
    return RecreateResult(
        config=asdict(config),
        events_lost=len(lost),
        applied_twice=twice,
        refused_without_flag=refused,
        lost_ids=lost,
        retired_rows=retired,
        statuses=dict(Counter(status.values())),
    )
