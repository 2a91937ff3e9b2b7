"""kafka-python clients built from the settings, with the settings a seconds-long edit needs.

Auto-commit is off (offsets are committed only after the journal row is durable), the consumer
starts from the earliest offset (a correction stream must not skip history), and the producer
keeps kafka-python 3's idempotent ``acks=all`` defaults for the DLQ and quarantine topics.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from daemon.config import KafkaSettings


def security_options(kafka: KafkaSettings) -> dict[str, Any]:
    """TLS and SASL options, only those the chosen protocol uses."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        password = kafka.sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_cafile"] = str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        options["ssl_certfile"] = str(kafka.ssl_certfile) if kafka.ssl_certfile else None
        options["ssl_keyfile"] = str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None
    return options


def build_consumer(kafka: KafkaSettings) -> KafkaConsumer:
    """A group consumer, not yet subscribed (the daemon subscribes with its rebalance listener)."""
    return KafkaConsumer(
        bootstrap_servers=list(kafka.bootstrap_servers),
        group_id=kafka.group_id,
        client_id=kafka.client_id,
        group_instance_id=kafka.group_instance_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=kafka.max_poll_records,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        session_timeout_ms=kafka.session_timeout_ms,
        **security_options(kafka),
    )


def build_producer(kafka: KafkaSettings) -> KafkaProducer:
    """Idempotent, acks=all (kafka-python 3 defaults): a DLQ record is never silently lost."""
    return KafkaProducer(
        bootstrap_servers=list(kafka.bootstrap_servers),
        client_id=f"{kafka.client_id}-producer",
        linger_ms=5,
        **security_options(kafka),
    )


def ensure_topics(kafka: KafkaSettings, partitions: int = 1, replication: int = 1) -> list[str]:
    """Create the four topics where missing (local broker and demos; clusters declare them)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    t = kafka.topics
    wanted = [t.corrections, t.dlq, t.control, t.quarantine]
    admin = KafkaAdminClient(
        bootstrap_servers=list(kafka.bootstrap_servers),
        client_id=f"{kafka.client_id}-admin",
        **security_options(kafka),
    )
    try:
        missing = [name for name in wanted if name not in set(admin.list_topics())]
        if missing:
            admin.create_topics([NewTopic(n, partitions, replication) for n in missing])
        return missing
    finally:
        admin.close()
