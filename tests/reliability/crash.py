"""Crash anywhere: kill -9 the daemon at seeded points, restart it, compare with a clean run.

The same N corrections are consumed twice on one topic, by two consumer groups:

* the **reference**: one uninterrupted in-process ``Daemon``;
* the **crashed** daemon: ``factkeeper run`` child processes, each killed with SIGKILL once the
  journal holds a seeded number of rows plus a seeded delay (so the kill lands anywhere in the
  next batch: mid-edit, mid-post-check, between the journal write and the offset commit), and
  restarted; after the last kill the final restart is an in-process ``Daemon`` that finishes
  the stream.

Why the weights are read from that final in-process restart rather than from a snapshot: its
constructor is the daemon's own recovery path (restore the newest snapshot, none here, then
replay the journal), so the model it ends with is the one the daemon serves after the crashes,
live edits included; a snapshot would need MLflow in every child (seconds per start) and would
only show the weights at its own moment. Snapshots are off, so every restart replays the whole
journal, the longest recovery there is.

After each kill the group's committed offset must not be ahead of the journal (committed <= last
journaled offset + 1); at the end every offset has exactly one journal row, every event id is
claimed exactly once, the applied and failed ids equal the reference's, and the weights are
bit-for-bit the reference's (the max abs difference is reported either way).
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    committed_offsets,
    config_file,
    create_topics,
    daemon_from_env,
    env_for,
    fact,
    journal_path,
    produce,
)
from tests.reliability.daemon_process import DaemonProcess, DaemonProcessError
from tests.reliability.observe import JournalView, journal_progress, offsets_ahead

#: Seconds an in-process run waits with nothing to consume before it counts the stream done.
IDLE_S = 3.0


@dataclass(frozen=True)
class CrashConfig:
    """One crash scenario; the kill points follow from ``seed``."""

    events: int = 150
    kills: int = 3
    seed: int = 0
    max_kill_delay_s: float = 0.5
    """Upper bound of the seeded pause between reaching a kill threshold and the SIGKILL."""
    static_membership: bool = True
    """Restarts rejoin as the same static member (KIP-345), so no session timeout is waited."""
    session_timeout_ms: int = 6000
    run_timeout_s: float = 900.0
    """Longest any one daemon run may take to reach its kill point or finish."""

    def __post_init__(self) -> None:
        if self.events < 20:
            raise ValueError("a crash scenario needs at least 20 events")
        if not 1 <= self.kills <= self.events // 4:
            raise ValueError(f"kills must be in 1..{self.events // 4} for {self.events} events")
        if self.max_kill_delay_s < 0:
            raise ValueError("max_kill_delay_s must be >= 0")

    def kill_plan(self) -> list[tuple[int, float]]:
        """(journal rows to wait for, extra delay in s) per kill: distinct, increasing rows."""
        rng = random.Random(self.seed)
        low, high = max(2, self.events // 20), self.events - self.events // 10
        thresholds = sorted(rng.sample(range(low, high), self.kills))
        return [(t, round(rng.uniform(0.0, self.max_kill_delay_s), 3)) for t in thresholds]


@dataclass(frozen=True)
class KillRecord:
    """One kill -9 and what was durable when the process was gone."""

    threshold: int
    delay_s: float
    journaled: int  # rows in the journal after the process died
    committed: dict[int, int | None]
    last_journaled: dict[int, int]
    offsets_ahead: list[str]
    run_s: float  # how long the killed process lived


@dataclass
class CrashResult:
    """What the crash scenario measured; ``failures()`` lists every broken promise."""

    config: dict[str, Any]
    kills: list[KillRecord] = field(default_factory=list)
    reference_s: float = 0.0
    crashed_s: float = 0.0
    total_s: float = 0.0
    final_replayed_events: int = 0
    final_replay_s: float = 0.0
    journal_rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    reference_statuses: dict[str, int] = field(default_factory=dict)
    offsets_not_once: list[int] = field(default_factory=list)
    ids_not_claimed_once: list[str] = field(default_factory=list)
    applied_ids_match_reference: bool = False
    failed_ids_match_reference: bool = False
    final_committed: dict[int, int | None] = field(default_factory=dict)
    final_offsets_ahead: list[str] = field(default_factory=list)
    weights_exactly_equal: bool = False
    max_abs_diff: float = float("inf")
    differing_tensors: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        n = self.config["events"]
        problems = []
        if len(self.kills) != self.config["kills"]:
            problems.append(f"{len(self.kills)} kills, {self.config['kills']} planned")
        for k in self.kills:
            if k.offsets_ahead:
                problems.append(f"after the kill at {k.threshold} rows: {k.offsets_ahead}")
        if self.journal_rows != n or self.offsets_not_once:
            problems.append(
                f"{self.journal_rows} journal rows for {n} records; offsets without exactly "
                f"one row: {self.offsets_not_once[:10]}"
            )
        if self.ids_not_claimed_once:
            problems.append(f"ids not claimed exactly once: {self.ids_not_claimed_once[:10]}")
        if not (self.applied_ids_match_reference and self.failed_ids_match_reference):
            problems.append(
                f"outcomes differ from the reference: {self.statuses} vs {self.reference_statuses}"
            )
        if self.final_committed != {0: n} or self.final_offsets_ahead:
            problems.append(f"final committed offsets {self.final_committed}, expected {{0: {n}}}")
        if not self.weights_exactly_equal:
            problems.append(
                f"weights differ from the uninterrupted run: max abs diff {self.max_abs_diff:.3g} "
                f"in {self.differing_tensors[:5]}"
            )
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_crash(bootstrap: str, workdir: Path, model_dir: Path, config: CrashConfig) -> CrashResult:
    """Run the scenario against the broker at ``bootstrap``; see the module docstring.

    Args:
        bootstrap: a running broker (the tests' session broker, or the bench's own).
        workdir: an empty folder for both daemons' homes and the children's logs.
        model_dir: the tiny editable model folder (``save_editable_tiny_model``).
        config: sizes and seed.
    """
    torch.set_num_threads(1)  # the children run with one thread; float sums must match theirs
    result = CrashResult(config=asdict(config))
    began = time.monotonic()
    topic = f"crash-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, topic)
    produce(bootstrap, topic, [to_bytes(fact(i)) for i in range(config.events)])
    ids = [fact(i)["id"] for i in range(config.events)]

    reference_env = env_for(
        workdir / "reference",
        bootstrap,
        topic,
        model_dir,
        FACTKEEPER_KAFKA__GROUP_ID=f"{topic}-reference",
    )
    # One after the other: overlapping them in a thread was slower on the shared 2-core box.
    expected, result.reference_s = _uninterrupted_run(reference_env, config.events)
    env, got = _crash_and_restart(bootstrap, workdir, model_dir, topic, config, result)
    reference_view = JournalView.read(journal_path(reference_env))

    journal = journal_path(env)
    group = env["FACTKEEPER_KAFKA__GROUP_ID"]
    view = JournalView.read(journal)
    result.journal_rows = len(view.rows)
    result.statuses = view.statuses()
    result.reference_statuses = reference_view.statuses()
    per_offset = view.rows_per_offset()
    result.offsets_not_once = [
        o for o in range(config.events) if per_offset.get((topic, 0, o), 0) != 1
    ]
    claims = view.claims_per_id()
    result.ids_not_claimed_once = [i for i in ids if claims.get(i, 0) != 1] + sorted(
        set(claims) - set(ids)
    )
    applied, failed = view.ids_with("applied"), view.ids_with("failed")
    result.applied_ids_match_reference = applied == reference_view.ids_with("applied")
    result.failed_ids_match_reference = failed == reference_view.ids_with("failed")
    result.final_committed = committed_offsets(bootstrap, group, topic)
    result.final_offsets_ahead = offsets_ahead(result.final_committed, view.last_offsets(topic))
    _compare_weights(result, expected, got)
    result.total_s = round(time.monotonic() - began, 2)
    return result


def _uninterrupted_run(env: dict[str, str], events: int) -> tuple[dict[str, torch.Tensor], float]:
    """The reference: one in-process daemon over the whole stream; its weights and seconds."""
    started = time.monotonic()
    daemon = daemon_from_env(env)
    try:
        daemon.run(max_messages=events, idle_timeout_s=60.0, handle_signals=False)
        weights = {k: v.detach().clone() for k, v in daemon.lm.model.state_dict().items()}
    finally:
        daemon.close()
    return weights, round(time.monotonic() - started, 2)


def _crash_and_restart(
    bootstrap: str,
    workdir: Path,
    model_dir: Path,
    topic: str,
    config: CrashConfig,
    result: CrashResult,
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Children killed at the planned points, then the final in-process restart.

    Returns:
        The crashed daemon's settings environment and its final weights.
    """
    extra = {"FACTKEEPER_KAFKA__SESSION_TIMEOUT_MS": str(config.session_timeout_ms)}
    if config.static_membership:
        extra["FACTKEEPER_KAFKA__GROUP_INSTANCE_ID"] = f"{topic}-crashed"
    env = env_for(workdir / "crashed", bootstrap, topic, model_dir, **extra)
    group = env["FACTKEEPER_KAFKA__GROUP_ID"]
    journal = journal_path(env)
    config_path = config_file(Path(env["FACTKEEPER_HOME"]))
    started = time.monotonic()
    for run, (threshold, delay) in enumerate(config.kill_plan()):
        log_path = workdir / "crashed" / f"run-{run}.log"
        with DaemonProcess(config_path, env, log_path) as child:
            _wait_for_rows(child, journal, threshold, config.run_timeout_s)
            time.sleep(delay)
            child.kill9()
            lived = time.monotonic() - child.started
        view = JournalView.read(journal)
        committed = committed_offsets(bootstrap, group, topic)
        last = view.last_offsets(topic)
        result.kills.append(
            KillRecord(
                threshold=threshold,
                delay_s=delay,
                journaled=len(view.rows),
                committed=committed,
                last_journaled=last,
                offsets_ahead=offsets_ahead(committed, last),
                run_s=round(lived, 2),
            )
        )

    final = daemon_from_env(env)  # the restart after the last kill: restore + replay
    try:
        result.final_replayed_events = final.replay.events
        result.final_replay_s = round(final.replay.seconds, 2)
        final.run(idle_timeout_s=IDLE_S, handle_signals=False)
        got = {k: v.detach().clone() for k, v in final.lm.model.state_dict().items()}
    finally:
        final.close()
    result.crashed_s = round(time.monotonic() - started, 2)
    return env, got


def _wait_for_rows(child: DaemonProcess, journal: Path, rows: int, timeout_s: float) -> None:
    """Poll the journal until it holds ``rows`` rows; fail if the child dies or hangs."""
    deadline = time.monotonic() + timeout_s
    while journal_progress(journal) < rows:
        if not child.alive():
            raise DaemonProcessError(
                f"daemon exited ({child.proc.returncode}) before journaling {rows} rows\n"
                f"{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DaemonProcessError(f"no {rows} journal rows after {timeout_s:.0f} s")
        time.sleep(0.02)


def _compare_weights(
    result: CrashResult, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> None:
    if expected.keys() != got.keys():
        result.differing_tensors = sorted(expected.keys() ^ got.keys())
        return
    diffs = {
        name: float((got[name].double() - expected[name].double()).abs().max()) for name in expected
    }
    result.max_abs_diff = max(diffs.values(), default=0.0)
    result.differing_tensors = sorted(n for n in expected if not torch.equal(got[n], expected[n]))
    result.weights_exactly_equal = not result.differing_tensors
