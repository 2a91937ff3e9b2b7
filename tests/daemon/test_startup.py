"""Start-up reliability against the real broker: a daemon started before its topics exist."""

from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from tests.daemon.builders import to_bytes
from tests.daemon.harness import daemon_from_env, env_for, fact

pytestmark = pytest.mark.kafka

APPLIED_WITHIN_S = 30.0
PRODUCE_AFTER_S = 3.0


def _produce_one(bootstrap: str, topic: str, payload: bytes) -> None:
    """Send one record; fails within 10 s when the topic does not exist (no auto-creation)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_block_ms=10_000)
    try:
        producer.send(topic, value=payload).get(timeout=10)
    finally:
        producer.close()


def _partitions(bootstrap: str, topic: str) -> set[int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return consumer.partitions_for_topic(topic) or set()
    finally:
        consumer.close()


def test_daemon_started_on_an_empty_broker_creates_its_topics_and_consumes(
    kafka_broker_no_autocreate, kafka_topic, tiny_model_dir, tmp_path
):
    """Like the cluster chart's brokers, this one does not auto-create topics: nothing exists
    until someone creates it, so a daemon that only subscribes would wait forever."""
    bootstrap = kafka_broker_no_autocreate
    env = env_for(
        tmp_path, bootstrap, kafka_topic, tiny_model_dir, FACTKEEPER_KAFKA__TOPIC_PARTITIONS="2"
    )
    daemon = daemon_from_env(env)
    produced: dict[str, object] = {}

    def producer() -> None:
        time.sleep(PRODUCE_AFTER_S)  # the daemon has started and subscribed by now
        try:
            _produce_one(bootstrap, kafka_topic, to_bytes(fact(1)))
        except KafkaError as exc:
            produced["error"] = exc
        else:
            produced["at"] = time.monotonic()

    def give_up() -> None:
        if daemon.consumer is not None:
            daemon.consumer.stop_requested.set()

    helper = threading.Thread(target=producer)
    stopper = threading.Timer(PRODUCE_AFTER_S + 10.0 + APPLIED_WITHIN_S, give_up)
    try:
        helper.start()
        stopper.start()
        daemon.run(max_messages=1, handle_signals=False)
        done_at = time.monotonic()
        helper.join(timeout=30)
        counts = daemon.journal.counts_by_status()
    finally:
        stopper.cancel()
        daemon.close()

    assert "error" not in produced, f"the topic was never created: {produced.get('error')!r}"
    assert counts["applied"] + counts["failed"] == 1, f"nothing consumed: {counts}"
    assert done_at - produced["at"] <= APPLIED_WITHIN_S
    for suffix in ("", ".dlq", ".control", ".quarantine"):
        assert _partitions(bootstrap, kafka_topic + suffix) == {0, 1}, suffix
