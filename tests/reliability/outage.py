"""Broker outage: the broker goes away mid-stream and comes back with the same data dir.

A broker of the scenario's own (free loopback ports, data under the work dir; never the tests'
session broker, which other tests share) serves one ``factkeeper run`` child. Once the child is
ready and has journaled some of the stream, the broker is stopped, left down for ``outage_s``,
and started again on the same data dir (same cluster id, topics, committed offsets). Meanwhile a
poller reads the child's ``/readyz`` every 0.25 s.

What must hold: the child never exits on its own (it keeps its in-memory model: its edits
counter at the end equals the journal's applied rows, with no replay in between); ``/readyz``
says not ready while the broker is down and ready again after it is back, without anyone
touching the daemon; every record gets exactly one journal row and every id one claim; the
final committed offset covers the whole stream; SIGTERM then ends it with exit code 0.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.devtools.kafka_broker import LocalBrokerConfig, start, stop
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    committed_offsets,
    config_file,
    create_topics,
    env_for,
    fact,
    journal_path,
    produce,
)
from tests.fixtures.kafka import free_loopback_ports
from tests.reliability.daemon_process import DaemonProcess, DaemonProcessError
from tests.reliability.observe import JournalView, ReadyzPoller, journal_progress


@dataclass(frozen=True)
class OutageConfig:
    """One outage scenario."""

    events: int = 60
    outage_s: float = 10.0
    """How long the broker stays stopped (after its shutdown returned, before it is started)."""
    stop_after: int = 15
    """Journal rows the daemon must hold before the broker is stopped."""
    timeout_s: float = 600.0
    """Longest wait for readiness, for ``stop_after`` rows, and for the whole stream."""
    broker_startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.stop_after < self.events:
            raise ValueError("stop_after must be between 0 and events (exclusive)")
        if self.outage_s <= 0:
            raise ValueError("outage_s must be positive")


@dataclass
class OutageResult:
    """What the outage scenario measured; ``failures()`` lists every broken promise."""

    config: dict[str, Any]
    broker_stop_s: float = 0.0  # how long the broker's shutdown took
    broker_down_s: float = 0.0  # stop returned -> start called
    broker_start_s: float = 0.0  # start called -> broker answering
    journaled_at_stop: int = 0
    journaled_while_down: int = 0
    ready_before_stop: bool = False
    not_ready_after_s: float | None = None  # from the stop call to the first not-ready answer
    not_ready_samples_while_down: int = 0
    ready_samples_while_down: int = 0
    ready_again_after_s: float | None = None  # from the broker answering to ready again
    drained_after_restart_s: float | None = None  # broker answering -> whole stream journaled
    daemon_alive_throughout: bool = False
    exit_code: int | None = None
    edits_applied_metric: float | None = None
    journal_rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    offsets_not_once: list[int] = field(default_factory=list)
    ids_not_claimed_once: list[str] = field(default_factory=list)
    final_committed: dict[int, int | None] = field(default_factory=dict)
    readiness_transitions: list[tuple[float, bool | None]] = field(default_factory=list)
    total_s: float = 0.0

    def failures(self) -> list[str]:
        n = self.config["events"]
        problems = []
        if not self.ready_before_stop:
            problems.append("the daemon was not ready before the broker stopped")
        if self.not_ready_samples_while_down == 0 or self.ready_samples_while_down:
            problems.append(
                f"/readyz while the broker was down: {self.not_ready_samples_while_down} not "
                f"ready, {self.ready_samples_while_down} ready (expected only not ready)"
            )
        if self.ready_again_after_s is None:
            problems.append("the daemon did not report ready again after the broker came back")
        if not self.daemon_alive_throughout:
            problems.append("the daemon exited before it was told to stop")
        if self.exit_code != 0:
            problems.append(f"the daemon exited with {self.exit_code} after SIGTERM")
        if self.journal_rows != n or self.offsets_not_once or self.ids_not_claimed_once:
            problems.append(
                f"{self.journal_rows} journal rows for {n} records; offsets not once "
                f"{self.offsets_not_once[:10]}; ids not claimed once "
                f"{self.ids_not_claimed_once[:10]}"
            )
        applied = self.statuses.get("applied", 0)
        if self.edits_applied_metric != applied:
            problems.append(
                f"factkeeper_edits_applied {self.edits_applied_metric} != {applied} applied rows "
                "(the daemon lost or rebuilt its state)"
            )
        if self.final_committed != {0: n}:
            problems.append(f"final committed offsets {self.final_committed}, expected {{0: {n}}}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_outage(workdir: Path, model_dir: Path, config: OutageConfig) -> OutageResult:
    """Start a broker of its own under ``workdir``, run the scenario, always stop the broker."""
    result = OutageResult(config=asdict(config))
    began = time.monotonic()
    port, controller_port = free_loopback_ports(2)
    broker = LocalBrokerConfig(
        port=port,
        controller_port=controller_port,
        data_dir=workdir / "kafka",
        startup_timeout_s=config.broker_startup_timeout_s,
    )
    start(broker)
    try:
        _run(broker, workdir, model_dir, config, result)
    finally:
        stop(broker)
    result.total_s = round(time.monotonic() - began, 2)
    return result


def _run(
    broker: LocalBrokerConfig,
    workdir: Path,
    model_dir: Path,
    config: OutageConfig,
    result: OutageResult,
) -> None:
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, topic)
    produce(broker.bootstrap, topic, [to_bytes(fact(i)) for i in range(config.events)])
    ids = [fact(i)["id"] for i in range(config.events)]
    env = env_for(workdir / "daemon", broker.bootstrap, topic, model_dir)
    journal = journal_path(env)
    metrics_port = int(env["FACTKEEPER_METRICS__PORT"])
    config_path = config_file(Path(env["FACTKEEPER_HOME"]))

    with (
        DaemonProcess(config_path, env, workdir / "daemon" / "daemon.log") as child,
        ReadyzPoller(metrics_port) as readyz,
    ):
        if readyz.wait_until(True, config.timeout_s) is None:
            raise DaemonProcessError(f"the daemon never became ready\n{child.log_tail()}")
        _wait(child, lambda: journal_progress(journal) >= config.stop_after, config.timeout_s)
        result.ready_before_stop = bool(readyz.probe().ready)

        stop_called = time.monotonic()
        result.journaled_at_stop = journal_progress(journal)
        stop(broker)
        down_since = time.monotonic()
        result.broker_stop_s = round(down_since - stop_called, 2)
        time.sleep(config.outage_s)
        start_called = time.monotonic()
        result.broker_down_s = round(start_called - down_since, 2)
        result.journaled_while_down = journal_progress(journal) - result.journaled_at_stop
        start(broker)
        up_since = time.monotonic()
        result.broker_start_s = round(up_since - start_called, 2)

        _wait(child, lambda: journal_progress(journal) >= config.events, config.timeout_s)
        result.drained_after_restart_s = round(time.monotonic() - up_since, 2)
        ready_again = readyz.wait_until(True, config.timeout_s, after=up_since)
        result.daemon_alive_throughout = child.alive()
        result.edits_applied_metric = _scrape(metrics_port, "factkeeper_edits_applied")
        result.exit_code = child.terminate()

    samples = readyz.samples
    result.not_ready_after_s = next(
        (round(s.t - stop_called, 2) for s in samples if s.t >= stop_called and s.ready is False),
        None,
    )
    # While the broker was fully down (its shutdown returned, its start not yet called): the
    # first 2 s are the watch's detection time (one check period plus one poll).
    window = [s for s in samples if down_since + 2.0 <= s.t <= start_called]
    result.not_ready_samples_while_down = sum(1 for s in window if s.ready is False)
    result.ready_samples_while_down = sum(1 for s in window if s.ready is True)
    if ready_again is not None:
        result.ready_again_after_s = round(ready_again - up_since, 2)
    previous: bool | None = None
    for s in samples:
        if s.ready is not previous:
            result.readiness_transitions.append((round(s.t - stop_called, 2), s.ready))
            previous = s.ready

    view = JournalView.read(journal)
    result.journal_rows = len(view.rows)
    result.statuses = view.statuses()
    per_offset = view.rows_per_offset()
    result.offsets_not_once = [
        o for o in range(config.events) if per_offset.get((topic, 0, o), 0) != 1
    ]
    claims = view.claims_per_id()
    result.ids_not_claimed_once = [i for i in ids if claims.get(i, 0) != 1]
    result.final_committed = committed_offsets(
        broker.bootstrap, env["FACTKEEPER_KAFKA__GROUP_ID"], topic
    )


def _wait(child: DaemonProcess, done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if not child.alive():
            raise DaemonProcessError(
                f"daemon exited ({child.proc.returncode}) mid-scenario\n{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DaemonProcessError(f"timed out after {timeout_s:.0f} s\n{child.log_tail()}")
        time.sleep(0.05)


def _scrape(port: int, name: str) -> float | None:
    """One sample's value from the daemon's ``/metrics`` (an unlabelled gauge or counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None
