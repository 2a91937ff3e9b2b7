"""Records that look valid but break a limit once normalised, or hide invisible characters.

Against the real broker and journal: such a record must go to the DLQ with its reason, and the
journal must stay readable (snapshots, audits and restarts read every applied row back).
"""

from __future__ import annotations

import pytest

from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    create_topics,
    daemon_from_env,
    dlq_records,
    env_for,
    fact,
    produce,
)

pytestmark = pytest.mark.kafka


def test_nfc_lengthened_and_invisible_records_go_to_the_dlq_and_restart_works(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    long_once_normalised = {**fact(1), "source": "a" * 250 + "\u0958" * 4}  # 258 after NFC
    zero_width = {**fact(2), "target_new": "Ro\u200bme"}
    tagged = {**fact(3), "source": "feed\U000e0041"}
    stream = [to_bytes(fact(0)), to_bytes(long_once_normalised), to_bytes(zero_width)]
    stream.append(to_bytes(tagged))
    produce(kafka_broker, kafka_topic, stream)
    env = env_for(tmp_path, kafka_broker, kafka_topic, tiny_model_dir)

    daemon = daemon_from_env(env)
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        counts = daemon.journal.counts_by_status()
        applied = daemon.journal.applied_events()  # what every snapshot and audit reads
    finally:
        daemon.close()
    assert counts["invalid"] == 3, counts
    assert all(e.event_id == "fact:0" for e in applied)

    dlq = dlq_records(kafka_broker, kafka_topic, 3)
    reasons = {r.value: dict(r.headers)["factkeeper.reason"].decode() for r in dlq}
    assert reasons == {
        stream[1]: "schema-violation",
        stream[2]: "invisible-character",
        stream[3]: "invisible-character",
    }
    detail = next(dict(r.headers)["factkeeper.detail"] for r in dlq if r.value == stream[1])
    assert b"after NFC normalisation" in detail

    again = daemon_from_env(env)  # a restart replays the journal
    try:
        assert again.replay.events == len(applied)
    finally:
        again.close()
