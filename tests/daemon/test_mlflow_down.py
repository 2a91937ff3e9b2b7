"""MLflow down: the daemon starts from base + journal, keeps consuming, retries with backoff."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from daemon.config import load_settings
from daemon.service import Daemon
from monitoring.metrics import FactkeeperMetrics
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    config_file,
    create_topics,
    env_for,
    fact,
    free_port,
    produce,
)

pytestmark = pytest.mark.kafka


def _daemon(env: dict) -> tuple[Daemon, FactkeeperMetrics]:
    from pathlib import Path

    metrics = FactkeeperMetrics(CollectorRegistry())
    settings = load_settings(config_file(Path(env["FACTKEEPER_HOME"])), env=env)
    return Daemon(settings, metrics=metrics, serve_metrics=False), metrics


def _value(metrics: FactkeeperMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_mlflow_unreachable_does_not_stop_the_daemon(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    closed = free_port()  # nothing listens here: MLflow is "down"
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__TRACKING_URI=f"http://127.0.0.1:{closed}",
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="1",
        FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN="true",
        FACTKEEPER_SNAPSHOTS__RETRY_INITIAL_S="3600",
        FACTKEEPER_SNAPSHOTS__REQUEST_MAX_RETRIES="0",
        FACTKEEPER_SNAPSHOTS__REQUEST_TIMEOUT_S="2",
    )
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(4)])

    daemon, metrics = _daemon(env)  # constructing contacted MLflow before: it raised here
    try:
        assert daemon.restored is not None and daemon.restored.version is None
        stats = daemon.run(idle_timeout_s=2.0, handle_signals=False)
        applied = daemon.journal.counts_by_status()["applied"]
    finally:
        daemon.close()
    assert stats.consumed == 4 and applied >= 2
    # The first scheduled snapshot failed; backoff (1 h) kept later edits from retrying it,
    # and the shutdown snapshot failed too without raising.
    assert _value(metrics, "factkeeper_snapshot_failures_total") == 2
    assert _value(metrics, "factkeeper_snapshot_consecutive_failures") == 2
    assert _value(metrics, "factkeeper_snapshot_last_success_timestamp_seconds") == 0

    # Still down at the next start: base weights + the whole journal replayed.
    daemon, _ = _daemon(env)
    try:
        assert daemon.restored.version is None
        assert daemon.replay.events == applied
    finally:
        daemon.close()
