"""The journal and the stream disagree: refuse to start, never skip or restart silently.

Issue 17, item 7, on the real broker: a re-created topic restarts at offset 0, where the
journal already holds rows of the old topic; a lost journal meets committed offsets.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from daemon.errors import JournalMismatchError
from daemon.service import Daemon
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    config_file,
    create_topics,
    daemon_from_env,
    env_for,
    fact,
    journal_path,
    produce,
)

pytestmark = pytest.mark.kafka


def _recreate(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topic])
        deadline = time.monotonic() + 60
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


def _run(env: dict, **options: bool) -> Daemon:
    from daemon.config import load_settings

    home = config_file(journal_path(env).parent.parent)
    daemon = Daemon(load_settings(home, env=env), serve_metrics=False, **options)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
    finally:
        daemon.close()
    return daemon


def test_a_recreated_topic_is_refused_then_consumed_anew_when_accepted(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in (0, 1)])
    _run(env)

    _recreate(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in (3, 6, 7)])
    with pytest.raises(JournalMismatchError, match="--accept-journal-mismatch"):
        _run(env)

    daemon = _run(env, accept_journal_mismatch=True)
    from daemon.records.journal import Journal

    with Journal.open(journal_path(env), create=False) as journal:
        for i in (3, 6, 7):
            assert journal.get(f"fact:{i}") is not None, f"fact:{i} was skipped"
        assert journal.get("fact:0").topic.startswith(f"{kafka_topic}~retired-")
    assert daemon.consumer.stats.results.get("already-journaled", 0) == 0


def test_an_empty_journal_beside_committed_offsets_is_refused(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(0))])
    _run(env)
    journal_path(env).unlink()  # the volume was lost
    with pytest.raises(JournalMismatchError, match="committed offsets"):
        _run(env)


def test_an_empty_journal_beside_registered_versions_is_refused(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
    )
    produce(kafka_broker, kafka_topic, [to_bytes(fact(0))])
    _run(env)
    journal_path(env).unlink()
    for suffix in ("-wal", "-shm"):
        journal_path(env).with_name(journal_path(env).name + suffix).unlink(missing_ok=True)
    with pytest.raises(JournalMismatchError, match="registered version"):
        daemon_from_env(env)
