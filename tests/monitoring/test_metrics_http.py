"""The metric set and the HTTP endpoints, over a real socket."""

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from monitoring.http import MetricsServer, Readiness
from monitoring.metrics import FactkeeperMetrics

DESIGN_METRICS = {
    "factkeeper_events_total",
    "factkeeper_edit_duration_seconds",
    "factkeeper_edit_batch_size",
    "factkeeper_edits_applied",
    "factkeeper_retention_ratio",
    "factkeeper_locality_ratio",
    "factkeeper_generalization_ratio",
    "factkeeper_audit_duration_seconds",
    "factkeeper_audit_last_success_timestamp_seconds",
    "factkeeper_model_version_info",
    "factkeeper_rollbacks_total",
    "factkeeper_consumer_lag_messages",
    "factkeeper_snapshot_duration_seconds",
    "factkeeper_snapshot_bytes",
    "factkeeper_weight_delta_norm",
    # issue 17: MLflow outages
    "factkeeper_snapshot_failures_total",
    "factkeeper_snapshot_consecutive_failures",
    "factkeeper_snapshot_last_success_timestamp_seconds",
    # issue 15: where edits took on the retry ladder
    "factkeeper_edits_by_rung_total",
}


@pytest.fixture
def served():
    metrics = FactkeeperMetrics(CollectorRegistry())
    readiness = Readiness("model_loaded", "partitions_assigned")
    server = MetricsServer(metrics.registry, readiness, "127.0.0.1", 0).start()
    yield metrics, readiness, f"http://127.0.0.1:{server.port}"
    server.stop()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_every_metric_in_the_design_is_exported(served):
    metrics, _, base = served
    metrics.set_model_version("3", "smollm2")
    metrics.rollbacks.labels(reason="gate").inc()
    metrics.set_lag({0: 5})
    metrics.set_delta_norms({"model.layers.7.mlp.down_proj.weight": 0.5})
    status, body = _get(base + "/metrics")
    assert status == 200
    exported = {
        line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and line[0] != "#"
    }
    names = {
        n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in exported
    }
    missing = DESIGN_METRICS - names
    assert not missing, missing


def test_counters_move_and_carry_no_event_contents(served):
    metrics, _, base = served
    metrics.events.labels(result="applied").inc(3)
    metrics.edit_duration.observe(1.5)
    _, body = _get(base + "/metrics")
    assert 'factkeeper_events_total{result="applied"} 3.0' in body
    assert 'factkeeper_events_total{result="invalid"} 0.0' in body
    assert 'factkeeper_edit_duration_seconds_bucket{le="2.0"} 1.0' in body


def test_readiness_follows_its_conditions(served):
    _, readiness, base = served
    assert _get(base + "/healthz")[0] == 200
    status, body = _get(base + "/readyz")
    assert status == 503 and json.loads(body)["conditions"] == {
        "model_loaded": False,
        "partitions_assigned": False,
    }
    readiness.set("model_loaded", True)
    readiness.set("partitions_assigned", True)
    assert _get(base + "/readyz")[0] == 200
    readiness.set("partitions_assigned", False)
    assert _get(base + "/readyz")[0] == 503
    assert _get(base + "/nope")[0] == 404


def test_two_instances_do_not_collide():
    FactkeeperMetrics(CollectorRegistry())
    FactkeeperMetrics(CollectorRegistry())


def test_the_memory_gauge_follows_the_rows_at_scrape_time():
    metrics = FactkeeperMetrics(CollectorRegistry())
    rows = [0]
    metrics.watch_memory(lambda: rows[0], capacity=4096)

    def scraped(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert scraped("factkeeper_memory_capacity_rows") == 4096
    assert scraped("factkeeper_memory_rows") == 0
    rows[0] = 3700  # an edit, a rollback or a restore changed the memory: no one reports it
    assert scraped("factkeeper_memory_rows") == 3700
