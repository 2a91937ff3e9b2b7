"""Control commands on a running daemon: signed topic records and the admin endpoint."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from daemon.control.auth import sign_control
from daemon.control.commands import Pause, Rollback, encode_control
from tests.daemon.harness import create_topics, daemon_from_env, env_for, free_port

pytestmark = pytest.mark.kafka

TOKEN = "admin-token-0123456789abcdef"
KEY = "control-key-0123456789abcdef"


def _send(bootstrap: str, topic: str, value: bytes, headers: list) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(topic, value=value, headers=headers)
    producer.flush()
    producer.close()


def test_unsigned_control_records_are_refused_and_admin_commands_run_between_batches(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    port = free_port()
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_ADMIN__ENABLED="true",
        FACTKEEPER_ADMIN__TOKEN=TOKEN,
        FACTKEEPER_ADMIN__PORT=str(port),
        FACTKEEPER_CONTROL__KEYS__K1=KEY,
    )
    control = f"{kafka_topic}.control"
    scope = {"key_id": "k1", "key": KEY, "topic": control, "group": f"{kafka_topic}-group"}
    unsigned = encode_control(Rollback(command="rollback", version=1))
    _send(kafka_broker, control, unsigned, [])
    signed = encode_control(Pause(command="pause"))
    headers = sign_control(signed, **scope)
    _send(kafka_broker, control, signed, headers)
    _send(kafka_broker, control, signed, headers)  # the same signed record, replayed
    stale = sign_control(signed, now=time.time() - 3600, **scope)
    _send(kafka_broker, control, signed, stale)
    with_token = sign_control(signed, **{**scope, "key": TOKEN})  # the bearer token is no key
    _send(kafka_broker, control, signed, with_token)

    answers: dict[str, object] = {}

    def admin_client() -> None:
        time.sleep(2.0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = encode_control(Pause(command="pause"))
        conn.request("POST", "/control", body, {"Authorization": f"Bearer {TOKEN}"})
        reply = conn.getresponse()
        answers["post"] = reply.status
        command_id = json.loads(reply.read())["id"]
        for _ in range(50):
            conn.request(
                "GET", f"/control/{command_id}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            state = json.loads(conn.getresponse().read())
            if state["status"] == "done":
                answers["state"] = state
                break
            time.sleep(0.2)

    daemon = daemon_from_env(env)
    client = threading.Thread(target=admin_client)  # posts once the topic's records are done
    try:
        client.start()
        daemon.run(idle_timeout_s=6.0, handle_signals=False)
        client.join(timeout=20)
        entries = daemon.journal.control_commands()
    finally:
        daemon.close()

    commands = [e.command.command for e in entries]
    assert commands == ["rollback", "pause", "pause", "pause", "pause", "pause"]
    assert entries[0].outcome.startswith("refused: unauthenticated")
    assert entries[1].outcome == "done"
    assert entries[2].outcome == "refused: unauthenticated (replayed: nonce already seen)"
    assert entries[3].outcome.startswith("refused: unauthenticated (stale")
    assert entries[4].outcome.startswith("refused: unauthenticated (wrong signature")
    assert entries[5].source.startswith("admin-http")
    assert answers["post"] == 202
    assert answers["state"]["outcome"] == "done"


def test_unsigned_control_records_are_refused_by_default(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)  # no key, no admin token
    _send(kafka_broker, f"{kafka_topic}.control", encode_control(Pause(command="pause")), [])
    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        [entry] = daemon.journal.control_commands()
        assert not daemon.consumer.paused
    finally:
        daemon.close()
    assert entry.outcome.startswith("refused: unauthenticated (no control.keys configured")
