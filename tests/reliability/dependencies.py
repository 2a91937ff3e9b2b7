"""Dependencies that are not there yet, or go away: topics created after start, MLflow down.

Two scenarios of issue 17, each with a ``factkeeper run`` child on a broker of its own:

* **topics_late**: the broker does not auto-create topics (like the cluster chart), no topic
  exists when the daemon starts, and a producer sends the stream ``produce_after_s`` later. The
  daemon must have created its topics (the producer fails otherwise) and apply every event.
* **mlflow_down**: snapshots go to a real ``mlflow server``; it is stopped after a third of the
  stream, stays down for ``down_s`` while events keep coming, and is started again on the same
  store. The daemon must keep consuming, count the failed snapshots, and register a version
  again once MLflow is back, without a restart.

Both report ``events_lost`` (produced ids with no claiming journal row) and ``applied_twice``
(ids with more than one applied or claiming row): 0 and 0 is the promise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.devtools.kafka_broker import LocalBrokerConfig, start, stop
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    config_file,
    create_topics,
    env_for,
    fact,
    free_port,
    journal_path,
    produce,
)
from tests.fixtures.kafka import free_loopback_ports
from tests.reliability.daemon_process import DaemonProcess, DaemonProcessError
from tests.reliability.observe import JournalView, journal_progress


@dataclass(frozen=True)
class TopicsLateConfig:
    events: int = 20
    produce_after_s: float = 10.0
    """How long after the daemon's start the first event is produced."""
    timeout_s: float = 300.0


@dataclass(frozen=True)
class MlflowDownConfig:
    events: int = 60
    down_s: float = 60.0
    snapshot_every: int = 5
    timeout_s: float = 600.0


@dataclass
class DependencyResult:
    """Figures shared by both scenarios; ``failures()`` lists every broken promise."""

    config: dict[str, Any]
    events_lost: int = -1
    applied_twice: int = -1
    journal_rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    daemon_alive_throughout: bool = False
    exit_code: int | None = None
    first_applied_after_produce_s: float | None = None
    all_journaled_after_produce_s: float | None = None
    produce_error: str | None = None
    # mlflow_down only
    mlflow_down_s: float | None = None
    journaled_while_down: int | None = None
    snapshot_failures_total: float | None = None
    consecutive_failures_at_end: float | None = None
    version_registered_after_recovery: bool | None = None
    total_s: float = 0.0

    def failures(self) -> list[str]:
        problems = []
        if self.produce_error:
            problems.append(f"producing failed: {self.produce_error}")
        if self.events_lost != 0 or self.applied_twice != 0:
            problems.append(f"events lost {self.events_lost}, applied twice {self.applied_twice}")
        if not self.daemon_alive_throughout:
            problems.append("the daemon exited before it was told to stop")
        if self.exit_code != 0:
            problems.append(f"the daemon exited with {self.exit_code} after SIGTERM")
        if self.version_registered_after_recovery is False:
            problems.append("no version was registered after MLflow came back")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _own_broker(workdir: Path, auto_create_topics: bool = True) -> LocalBrokerConfig:
    port, controller_port = free_loopback_ports(2)
    return LocalBrokerConfig(
        port=port,
        controller_port=controller_port,
        data_dir=workdir / "kafka",
        startup_timeout_s=120.0,
        auto_create_topics=auto_create_topics,
    )


def _count(result: DependencyResult, journal: Path, ids: list[str]) -> None:
    view = JournalView.read(journal)
    result.journal_rows = len(view.rows)
    result.statuses = view.statuses()
    claims = view.claims_per_id()
    result.events_lost = sum(1 for i in ids if claims.get(i, 0) == 0)
    applied = view.ids_with("applied")
    result.applied_twice = sum(1 for i in ids if claims.get(i, 0) > 1 or applied.count(i) > 1)


def _wait_rows(child: DaemonProcess, journal: Path, rows: int, timeout_s: float) -> float:
    began = time.monotonic()
    while journal_progress(journal) < rows:
        if not child.alive():
            raise DaemonProcessError(f"daemon exited mid-scenario\n{child.log_tail()}")
        if time.monotonic() - began > timeout_s:
            raise DaemonProcessError(f"timed out waiting for {rows} rows\n{child.log_tail()}")
        time.sleep(0.05)
    return time.monotonic() - began


def _scrape(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def run_topics_late(workdir: Path, model_dir: Path, config: TopicsLateConfig) -> DependencyResult:
    """A daemon started on a broker without its topics; events produced later."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    result = DependencyResult(config=asdict(config))
    began = time.monotonic()
    broker = _own_broker(workdir, auto_create_topics=False)
    start(broker)
    try:
        topic = f"late-{uuid.uuid4().hex[:8]}"
        ids = [fact(i)["id"] for i in range(config.events)]
        env = env_for(workdir / "daemon", broker.bootstrap, topic, model_dir)
        journal = journal_path(env)
        with DaemonProcess(
            config_file(Path(env["FACTKEEPER_HOME"])), env, workdir / "daemon" / "daemon.log"
        ) as child:
            time.sleep(config.produce_after_s)
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_block_ms=30_000)
            try:
                for i in range(config.events):
                    producer.send(topic, value=to_bytes(fact(i))).get(timeout=30)
            except KafkaError as exc:
                result.produce_error = f"{type(exc).__name__}: {exc}"
            finally:
                producer.close()
            produced = time.monotonic()
            if result.produce_error is None:
                _wait_rows(child, journal, 1, config.timeout_s)
                result.first_applied_after_produce_s = round(time.monotonic() - produced, 2)
                _wait_rows(child, journal, config.events, config.timeout_s)
                result.all_journaled_after_produce_s = round(time.monotonic() - produced, 2)
            result.daemon_alive_throughout = child.alive()
            result.exit_code = child.terminate()
        _count(result, journal, ids)
    finally:
        stop(broker)
    result.total_s = round(time.monotonic() - began, 2)
    return result


class MlflowServer:
    """A real ``mlflow server`` on a SQLite store under ``folder``; stop and start it again."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow), "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = (self.folder / "server.log").open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise DaemonProcessError(f"mlflow server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server's workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None


def run_mlflow_down(workdir: Path, model_dir: Path, config: MlflowDownConfig) -> DependencyResult:
    """A daemon whose MLflow server goes away for ``down_s`` mid-stream and comes back."""
    result = DependencyResult(config=asdict(config))
    began = time.monotonic()
    broker = _own_broker(workdir)
    start(broker)
    server = MlflowServer(workdir / "mlflow", free_port())
    try:
        server.start()
        topic = f"mlflow-down-{uuid.uuid4().hex[:8]}"
        create_topics(broker.bootstrap, topic)
        ids = [fact(i)["id"] for i in range(config.events)]
        env = env_for(
            workdir / "daemon",
            broker.bootstrap,
            topic,
            model_dir,
            FACTKEEPER_SNAPSHOTS__TRACKING_URI=server.uri,
            FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS=str(config.snapshot_every),
            FACTKEEPER_SNAPSHOTS__RETRY_INITIAL_S="5",
            FACTKEEPER_SNAPSHOTS__RETRY_MAX_S="20",
            FACTKEEPER_SNAPSHOTS__REQUEST_MAX_RETRIES="0",
            FACTKEEPER_SNAPSHOTS__REQUEST_TIMEOUT_S="5",
        )
        journal = journal_path(env)
        port = int(env["FACTKEEPER_METRICS__PORT"])
        third = config.events // 3
        with DaemonProcess(
            config_file(Path(env["FACTKEEPER_HOME"])), env, workdir / "daemon" / "daemon.log"
        ) as child:
            produce(broker.bootstrap, topic, [to_bytes(fact(i)) for i in range(third)])
            _wait_rows(child, journal, third, config.timeout_s)
            server.stop()
            down_since = time.monotonic()
            at_stop = journal_progress(journal)
            produce(broker.bootstrap, topic, [to_bytes(fact(i)) for i in range(third, 2 * third)])
            time.sleep(max(0.0, config.down_s - (time.monotonic() - down_since)))
            result.journaled_while_down = journal_progress(journal) - at_stop
            server.start()
            back = time.time()
            result.mlflow_down_s = round(time.monotonic() - down_since, 1)
            produce(
                broker.bootstrap,
                topic,
                [to_bytes(fact(i)) for i in range(2 * third, config.events)],
            )
            _wait_rows(child, journal, config.events, config.timeout_s)
            deadline = time.monotonic() + 120
            recovered = False
            while time.monotonic() < deadline and not recovered:
                last = _scrape(port, "factkeeper_snapshot_last_success_timestamp_seconds") or 0
                recovered = last >= back
                time.sleep(1.0)
            result.version_registered_after_recovery = recovered
            result.snapshot_failures_total = _scrape(port, "factkeeper_snapshot_failures_total")
            result.consecutive_failures_at_end = _scrape(
                port, "factkeeper_snapshot_consecutive_failures"
            )
            result.daemon_alive_throughout = child.alive()
            result.exit_code = child.terminate()
        _count(result, journal, ids)
    finally:
        server.stop()
        stop(broker)
    result.total_s = round(time.monotonic() - began, 2)
    return result
