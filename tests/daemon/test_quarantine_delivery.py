"""A failed audit's quarantine records must reach the broker before anything is marked.

The quarantine topic is created with a ``max.message.bytes`` smaller than any quarantine record
(its audit-figures header alone is larger), so the real broker refuses every send. The gate is
forced to fail: a random tiny model gives no meaningful audit figures, and what is under test
is the delivery check, not the gate.
"""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

import daemon.audits.runner as auditing
from daemon.control.commands import RunAudit, encode_control
from daemon.errors import QuarantineDeliveryError
from monitoring.gates import GateDecision
from tests.daemon.builders import to_bytes
from tests.daemon.harness import daemon_from_env, env_for, fact, produce

pytestmark = pytest.mark.kafka


def _topics_with_a_tiny_quarantine(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    names = [topic, f"{topic}.dlq", f"{topic}.control"]
    admin.create_topics(
        [NewTopic(n, 1, 1) for n in names]
        + [NewTopic(f"{topic}.quarantine", 1, 1, topic_configs={"max.message.bytes": "64"})]
    )
    admin.close()


def test_undelivered_quarantine_records_fail_the_audit_before_anything_is_marked(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path, monkeypatch
):
    _topics_with_a_tiny_quarantine(kafka_broker, kafka_topic)
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
        FACTKEEPER_CONTROL__ALLOW_UNSIGNED="true",  # not about signing
        FACTKEEPER_AUDIT__EVERY_MINUTES="600",  # audits on, none due during the test
    )
    # One edit, one quarantine record: with several, kafka-python's flush raises on its own
    # (the idempotent producer aborts the rest after the first refusal); a single refused
    # record only fails its future, which is what went unchecked.
    produce(kafka_broker, kafka_topic, [to_bytes(fact(0))])
    monkeypatch.setattr(
        auditing, "evaluate_gate", lambda *a, **k: GateDecision(False, ("forced by the test",))
    )
    refusals = []
    real_quarantine = auditing.AuditRunner._quarantine

    def spy(self, *args, **kwargs):
        try:
            return real_quarantine(self, *args, **kwargs)
        except QuarantineDeliveryError as exc:
            refusals.append(exc)
            raise

    monkeypatch.setattr(auditing.AuditRunner, "_quarantine", spy)
    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        before = [e.event_id for e in daemon.journal.applied_events()]
        audit_request = [encode_control(RunAudit(command="audit"))]
        produce(kafka_broker, f"{kafka_topic}.control", audit_request)
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        applied = [e.event_id for e in daemon.journal.applied_events()]
        counts = daemon.journal.counts_by_status()
        production = daemon.versions.production()
        rollbacks = daemon.metrics.rollbacks.labels(reason="audit-gate")._value.get()
        (audit,) = daemon.journal.control_commands()
    finally:
        daemon.close()

    assert before == ["fact:0"], "the tiny model must take the edit"
    # The broker refused the record: nothing is marked quarantined, nothing rolled back.
    assert counts.get("quarantined", 0) == 0, "marked quarantined, but not on the topic"
    assert applied == before
    assert production is None and rollbacks == 0
    assert audit.outcome.startswith("failed:") and "not delivered" in audit.outcome
    (error,) = refusals
    assert set(error.event_ids) == set(applied)
