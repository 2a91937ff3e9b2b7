"""The local broker is a real Kafka: consumer groups resume from manual commits, and the
``start``/``stop``/``status`` lifecycle behaves as the CLI expects."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.serializer import JsonSerializer
from kafka.structs import OffsetAndMetadata

from daemon.devtools.kafka_broker import (
    BrokerError,
    BrokerStartError,
    JavaNotFoundError,
    LocalBrokerConfig,
    MavenNotFoundError,
    PortInUseError,
    start,
    status,
    stop,
)
from tests.fixtures.kafka import free_loopback_ports

RECORDS = 100
FIRST_BATCH = 50


def _consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=10,
        value_deserializer=JsonSerializer(),
    )
    consumer.subscribe([topic])
    return consumer


def _consume_and_commit(consumer: KafkaConsumer, limit: int, deadline_s: float) -> list[int]:
    """Poll, commit each record's offset + 1 after handling it, stop at ``limit`` records."""
    ids: list[int] = []
    deadline = time.monotonic() + deadline_s
    while len(ids) < limit and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500).items():
            for record in records:
                if len(ids) == limit:
                    break
                ids.append(record.value["id"])
                consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
    return ids


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_group_resumes_after_manual_commits(kafka_broker: str, kafka_topic: str) -> None:
    with KafkaAdminClient(bootstrap_servers=kafka_broker) as admin:
        admin.create_topics(
            {kafka_topic: {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True
        )
    with KafkaProducer(
        bootstrap_servers=kafka_broker, acks="all", value_serializer=JsonSerializer()
    ) as producer:
        sent = [producer.send(kafka_topic, {"id": i, "subject": f"s{i}"}) for i in range(RECORDS)]
        producer.flush(timeout=30)
        offsets = [future.get(timeout=10).offset for future in sent]
    assert offsets == list(range(RECORDS))

    group = f"{kafka_topic}-group"
    first = _consumer(kafka_broker, kafka_topic, group)
    try:
        first_ids = _consume_and_commit(first, FIRST_BATCH, deadline_s=30)
    finally:
        first.close(autocommit=False)
    assert first_ids == list(range(FIRST_BATCH))
    with KafkaAdminClient(bootstrap_servers=kafka_broker) as admin:
        committed = admin.list_group_offsets(group)[group]
    assert committed[TopicPartition(kafka_topic, 0)].offset == FIRST_BATCH

    second = _consumer(kafka_broker, kafka_topic, group)
    try:
        rest_ids = _consume_and_commit(second, RECORDS - FIRST_BATCH, deadline_s=30)
        # Past the last record: a bounded quiet wait in which nothing else may arrive.
        extra = _consume_and_commit(second, RECORDS, deadline_s=1.5)
    finally:
        second.close(autocommit=False)
    assert rest_ids == list(range(FIRST_BATCH, RECORDS))
    assert extra == []


@pytest.mark.kafka
def test_start_is_idempotent(kafka_broker: str, kafka_broker_config: LocalBrokerConfig) -> None:
    before = status(kafka_broker_config)
    again = start(kafka_broker_config)
    assert before.running and again.running
    assert again.pid == before.pid
    assert again.bootstrap == kafka_broker


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_stop_then_status_and_warm_restart(tmp_path: Path) -> None:
    port, controller_port = free_loopback_ports(2)
    cfg = LocalBrokerConfig(port=port, controller_port=controller_port, data_dir=tmp_path / "k")
    first = start(cfg)
    try:
        assert first.running and first.pid is not None
        cluster_id = cfg.cluster_id_file.read_text()

        stopped = stop(cfg)
        assert not stopped.running and stopped.pid is None
        assert not status(cfg).running
        assert not cfg.pid_file.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(first.pid, 0)
        assert not stop(cfg).running  # stopping a stopped broker is fine

        again = start(cfg)  # storage already formatted: same cluster, new process
        assert again.running and again.pid != first.pid
        assert cfg.cluster_id_file.read_text() == cluster_id
    finally:
        stop(cfg)


def test_missing_java_is_a_broker_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no java on it
    port, controller_port = free_loopback_ports(2)  # port + 1 may be someone else's
    cfg = LocalBrokerConfig(port=port, controller_port=controller_port, data_dir=tmp_path / "k")
    with pytest.raises(JavaNotFoundError, match="Java was not found") as caught:
        start(cfg)
    assert isinstance(caught.value, BrokerError)
    assert not status(cfg).running


def test_missing_libs_without_maven_is_a_broker_error(tmp_path: Path) -> None:
    port, controller_port = free_loopback_ports(2)
    cfg = LocalBrokerConfig(
        port=port,
        controller_port=controller_port,
        data_dir=tmp_path / "k",
        libs_dir=tmp_path / "no-libs",
        mvn_bin=str(tmp_path / "no-mvn"),
    )
    with pytest.raises(MavenNotFoundError, match="jars are missing"):
        start(cfg)


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = LocalBrokerConfig(port=taken.getsockname()[1], data_dir=tmp_path / "k")
        with pytest.raises(PortInUseError, match="already in use"):
            start(cfg)


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_broker_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    port, controller_port = free_loopback_ports(2)
    cfg = LocalBrokerConfig(
        port=port, controller_port=controller_port, data_dir=tmp_path / "k", heap="1k"
    )
    with pytest.raises(BrokerStartError, match="exited with code") as caught:
        start(cfg)
    assert "heap" in str(caught.value).lower()  # the JVM's own complaint, from broker.out
    assert not status(cfg).running and not cfg.pid_file.exists()


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_start_timeout_stops_the_half_started_broker(tmp_path: Path) -> None:
    port, controller_port = free_loopback_ports(2)
    cfg = LocalBrokerConfig(
        port=port, controller_port=controller_port, data_dir=tmp_path / "k", startup_timeout_s=0.2
    )
    with pytest.raises(BrokerStartError, match="did not answer"):
        start(cfg)  # a JVM needs seconds to get this far
    assert not status(cfg).running and not cfg.pid_file.exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": 0}, "port"),
        ({"port": 9092, "controller_port": 9092}, "controller_port"),
        ({"heap": "lots"}, "heap"),
        ({"startup_timeout_s": 0}, "startup_timeout_s"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalBrokerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    cfg = LocalBrokerConfig(port=19092)
    assert cfg.controller_port == 19093
    assert cfg.bootstrap == "127.0.0.1:19092"
    assert (cfg.deploy_dir / "pom.xml").is_file()
    assert cfg.libs_dir == cfg.deploy_dir / "target" / "libs"
