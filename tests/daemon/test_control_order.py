"""Control commands act as of their position in the stream, and run once (issue 17, item 5).

Real broker, real journal and registry: a ``rollback`` fetched in the same poll as corrections
produced after it must not discard them, and a control record redelivered because its offset
commit was lost must not run again over newer edits.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from daemon.control.commands import Rollback, encode_control
from tests.daemon.builders import to_bytes
from tests.daemon.harness import create_topics, daemon_from_env, env_for, fact, produce

pytestmark = pytest.mark.kafka


def _statuses(env: dict, ids: list[str]) -> dict[str, str]:
    daemon = daemon_from_env(env)
    try:
        return {i: daemon.journal.get(i).status for i in ids}
    finally:
        daemon.close()


def _run(env: dict) -> None:
    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
    finally:
        daemon.close()


def _rewind_commit(bootstrap: str, group: str, topic: str, offset: int) -> None:
    """What a crash between journaling a control record and committing it leaves behind."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close(autocommit=False)


def test_rollback_acts_at_its_position_and_runs_once(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    control = f"{kafka_topic}.control"
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_BATCHING__MAX_SIZE="8",  # one poll may return records of both topics
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
        FACTKEEPER_CONTROL__ALLOW_UNSIGNED="true",
    )
    produce(kafka_broker, kafka_topic, [to_bytes(fact(0))])
    _run(env)  # fact:0, then version 1 at shutdown
    produce(kafka_broker, kafka_topic, [to_bytes(fact(1))])
    _run(env)  # fact:1, then version 2

    producer = KafkaProducer(bootstrap_servers=kafka_broker)
    producer.send(control, value=encode_control(Rollback(command="rollback", version=1)))
    producer.flush()
    time.sleep(0.05)  # the corrections are produced strictly after the rollback
    for i in (3, 6):
        producer.send(kafka_topic, value=to_bytes(fact(i)))
    producer.flush()
    producer.close()
    _run(env)

    ids = ["fact:0", "fact:1", "fact:3", "fact:6"]
    after_rollback = _statuses(env, ids)
    assert after_rollback["fact:1"] == "rolled_back"
    assert after_rollback["fact:3"] != "rolled_back", after_rollback
    assert after_rollback["fact:6"] != "rolled_back", after_rollback
    assert "applied" in (after_rollback["fact:3"], after_rollback["fact:6"])

    # The rollback's offset commit is lost; a new correction arrives; the daemon restarts.
    _rewind_commit(kafka_broker, f"{kafka_topic}-group", control, 0)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(7))])
    _run(env)

    again = _statuses(env, ids)
    assert again == after_rollback, "the redelivered rollback ran again"
    daemon = daemon_from_env(env)
    try:
        rollbacks = [
            e for e in daemon.journal.control_commands() if e.command.command == "rollback"
        ]
    finally:
        daemon.close()
    assert len(rollbacks) == 1
