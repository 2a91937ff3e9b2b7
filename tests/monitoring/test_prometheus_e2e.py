"""A real Prometheus server scrapes a real daemon (tiny model, real broker) and sees it work."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.daemon.builders import to_bytes
from tests.daemon.harness import create_topics, daemon_from_env, env_for, fact, free_port, produce

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kafka


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]["result"]


def _value(base: str, promql: str) -> float | None:
    result = _query(base, promql)
    return float(result[0]["value"][1]) if result else None


def _wait_for(base: str, promql: str, predicate, timeout_s: float = 60.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        try:
            value = _value(base, promql)
        except OSError:
            value = None
        if value is not None and predicate(value):
            return value
        time.sleep(0.5)
    return value


@pytest.fixture
def prometheus(tmp_path):
    """Start Debian's prometheus on a free loopback port; yield (base_url, metrics_port)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: `make test` installs Debian's prometheus package")
    metrics_port, web_port = free_port(), free_port()
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(ROOT / "monitoring" / "alerts.yaml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    base = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        yield base, metrics_port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_prometheus_sees_the_daemon_work(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path, prometheus
):
    base, metrics_port = prometheus
    create_topics(kafka_broker, kafka_topic)
    good = [to_bytes(fact(i)) for i in range(8)]
    bad = [b"{oops", to_bytes({**fact(50), "subject": "Nobody"}), b"\xff\xfe"]
    produce(kafka_broker, kafka_topic, good[:4] + bad + good[4:])
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_METRICS__PORT=str(metrics_port),
    )

    def serve() -> None:  # the journal belongs to the thread that opens it
        daemon = daemon_from_env(env, serve_metrics=True)
        try:
            daemon.run(idle_timeout_s=8.0, handle_signals=False)
        finally:
            daemon.close()

    runner = threading.Thread(target=serve)
    runner.start()
    try:
        assert _wait_for(base, 'up{job="factkeeper"}', lambda v: v == 1.0) == 1.0
        invalid = 'factkeeper_events_total{result="invalid"}'
        assert _wait_for(base, invalid, lambda v: v == 3.0) == 3.0
        done = 'sum(factkeeper_events_total{result=~"applied|failed"})'
        assert _wait_for(base, done, lambda v: v == 8.0) == 8.0
        applied = _value(base, 'factkeeper_events_total{result="applied"}')
        assert _wait_for(base, "factkeeper_edits_applied", lambda v: v == applied) == applied
        count = _wait_for(base, "factkeeper_edit_duration_seconds_count", lambda v: v >= 1)
        assert count is not None and count >= 1
        rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5).read())
        assert len(rules["data"]["groups"]) == 3  # monitoring/alerts.yaml, loaded by the server
    finally:
        runner.join(timeout=180)
    assert _wait_for(base, 'up{job="factkeeper"}', lambda v: v == 0.0, timeout_s=20) == 0.0
