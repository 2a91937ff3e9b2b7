"""The audit schedule across restarts: edits since the last audit are counted from the journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitoring.probes.load import bundled_probe_path
from tests.daemon.builders import to_bytes
from tests.daemon.harness import create_topics, daemon_from_env, env_for, fact, produce

pytestmark = pytest.mark.kafka

EVERY_N = 5


def _run_once(env: dict) -> int:
    """One daemon process's life: consume what is there, stop; returns the edits it applied."""
    daemon = daemon_from_env(env)
    try:
        before = daemon.journal.counts_by_status()["applied"]
        daemon.run(idle_timeout_s=2.0, handle_signals=False)
        return daemon.journal.counts_by_status()["applied"] - before
    finally:
        daemon.close()


def test_edits_before_a_restart_count_towards_the_next_audit(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(bundled_probe_path().read_text().splitlines()[:8]) + "\n")
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_AUDIT__EVERY_N_EDITS=str(EVERY_N),
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",  # audits need versions to act on a gate
        FACTKEEPER_AUDIT__PROBE_SET=str(probes),
        FACTKEEPER_AUDIT__RETENTION_FLOOR="0",
        FACTKEEPER_AUDIT__LOCALITY_FLOOR="0",
        FACTKEEPER_AUDIT__MAX_DROP="1",
        FACTKEEPER_AUDIT__MAX_PERPLEXITY_DRIFT="100",
    )
    reports = Path(env["FACTKEEPER_HOME"]) / "state" / "audits"

    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(4)])
    first = _run_once(env)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(4, 8)])
    second = _run_once(env)

    assert first < EVERY_N and second < EVERY_N, "each life alone must stay below the trigger"
    assert first + second >= EVERY_N, f"too few edits took ({first} + {second})"
    found = [json.loads(p.read_text()) for p in sorted(reports.glob("audit-*.json"))]
    assert [r["trigger"] for r in found] == ["edits"], "no audit after the restart"
    assert found[0]["edits_total"] >= EVERY_N
