"""Start-up reliability against the real broker: a daemon started before its topics exist."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from daemon.config import load_settings
from daemon.control.commands import Pause, Resume, encode_control
from daemon.service import Daemon
from editing.adapters import MlpRole
from editing.keystats import KeyStatistics
from editing.paths import Paths
from editing.registry import get_editor
from editing.safeguard_config import SafeguardConfig
from editing.safeguards import GuardedEditor
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    config_file,
    create_topics,
    daemon_from_env,
    env_for,
    fact,
    produce,
)
from tests.editing.test_safeguards import CORPUS

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


@pytest.mark.kafka
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


class _ReadyzWatchingStatistics(KeyStatistics):
    """Real key statistics that also read ``/readyz`` when asked to prepare them."""

    def __init__(self, port: int, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.port = port
        self.readyz_during: list[tuple[int, dict]] = []

    def prepare(self, lm, targets, on_progress=None):  # type: ignore[override]
        def watch(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(done, total)
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/readyz")
            reply = conn.getresponse()
            self.readyz_during.append((reply.status, json.loads(reply.read())))

        return super().prepare(lm, targets, on_progress=watch)


def test_key_statistics_are_computed_at_start_and_readyz_says_why_it_waits(
    tiny_model_dir, tmp_path
):
    env = env_for(tmp_path, "127.0.0.1:9", "unused", tiny_model_dir)  # no broker needed
    settings = load_settings(config_file(Path(env["FACTKEEPER_HOME"])), env=env)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    stats = _ReadyzWatchingStatistics(
        settings.metrics.port,
        Paths(tmp_path / "stats"),
        corpus=corpus,
        max_tokens=1024,
        seq_len=16,
        batch_size=4,
        progress=False,
    )
    config = SafeguardConfig.only(["preserve"], preserve_lambda=1.0, max_unexplained=1.0)
    editor = GuardedEditor(get_editor("ft", **FT_OPTIONS), config, stats=stats)
    daemon = Daemon(settings, editor=editor, serve_metrics=True, paths=Paths(tmp_path / "home"))
    try:
        assert stats.readyz_during, "the key statistics were not computed at start"
        status, body = stats.readyz_during[-1]
        assert status == 503 and body["conditions"]["key_statistics"] is False
        assert "computing key statistics" in body["reasons"]["key_statistics"]
        assert daemon.readiness.snapshot()["key_statistics"] is True
        assert "key_statistics" not in daemon.readiness.reasons()
        layer = FT_OPTIONS["layer"]
        assert (daemon.lm.base_hash, MlpRole.DOWN.value, layer) in stats._memo
    finally:
        daemon.close()


@pytest.mark.kafka
def test_pause_survives_a_restart_until_resume(kafka_broker, kafka_topic, tiny_model_dir, tmp_path):
    create_topics(kafka_broker, kafka_topic)
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_CONTROL__ALLOW_UNSIGNED="true",  # not about signing
    )
    control = f"{kafka_topic}.control"
    produce(kafka_broker, control, [encode_control(Pause(command="pause"))])
    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=2.0, handle_signals=False)
        assert daemon.consumer.paused
    finally:
        daemon.close()

    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(2)])
    daemon = daemon_from_env(env)  # the restart
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        counts = daemon.journal.counts_by_status()
    finally:
        daemon.close()
    assert counts["applied"] + counts["failed"] == 0, f"a paused daemon consumed: {counts}"

    produce(kafka_broker, control, [encode_control(Resume(command="resume"))])
    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        counts = daemon.journal.counts_by_status()
        assert not daemon.consumer.paused
    finally:
        daemon.close()
    assert counts["applied"] + counts["failed"] == 2


def _healthz(port: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/healthz")
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())


@pytest.mark.kafka
def test_healthz_follows_the_main_loops_heartbeat(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_METRICS__HEALTHZ_MAX_AGE_S="1.0",
    )
    port = int(env["FACTKEEPER_METRICS__PORT"])
    daemon = daemon_from_env(env, serve_metrics=True)
    during: list[int] = []

    def probe() -> None:
        for _ in range(4):
            time.sleep(0.6)
            during.append(_healthz(port)[0])

    prober = threading.Thread(target=probe)
    try:
        prober.start()
        daemon.run(idle_timeout_s=3.5, handle_signals=False)
        prober.join(timeout=10)
        time.sleep(1.5)  # the loop has stopped: no more beats
        status, body = _healthz(port)
    finally:
        daemon.close()
    assert during == [200] * 4, during
    assert status == 503 and body["status"] == "stale", body
    assert body["heartbeat_age_seconds"] > 1.0
