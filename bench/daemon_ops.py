"""Issue 6's operational figures: what the daemon's full path costs on top of the bare editor.

For each method this measures, on one real local Kafka broker and in one invocation:

* **drain**: N CounterFact corrections are queued on a fresh topic first, then an in-process
  ``Daemon`` consumes them through the full path (validate, edit, post-check, the retry ladder for
  edits that did not take, DLQ, journal, offset commit, snapshots); events/s = consumed / wall
  time of ``run``. The wall time is split per stage by wrapping the daemon's own objects (no
  daemon code changes);
* **bare editor**: the same N requests through ``editor.apply`` on a freshly loaded model, in
  batches of the daemon's ``batching.max_size``, no Kafka and no post-check; the daemon/bare
  ratio is the daemon's overhead (including the edits the post-check undoes and retries);
* **steady latency**: the same daemon, continuing, while a producer thread sends 1 event/s;
  event-to-applied latency = journal ``applied_at`` - the Kafka record timestamp (CreateTime);
* **peak RSS** of the daemon's process: ``ru_maxrss`` and a sampled ``VmRSS`` per phase;
* **restart** (``--restart-edits N``): a daemon with snapshots off consumes a fresh stream until
  the journal holds N applied edits and is killed with SIGKILL; a new process then starts it
  again twice: once with ``journal.store_deltas: false`` (every edit re-edited, as before
  issue 20) only to ready, and once as shipped (stored deltas added back), to ready and on to
  the first batch journaled after the restart (group join, edit, post-check, journal; one
  record asked for, the whole batch it polled is flushed). Start = the worker's first line.

The JSON's ``summary`` holds one object per method under the keys every later measurement of
issue 20 uses: ``drain_applied_per_s`` (applied edits per second of the drain),
``drain_ratio_vs_bare`` (that rate over the bare editor's in the same run),
``restart_to_ready_seconds`` (the shipped restart, stored deltas on) and ``peak_rss_bytes`` (the
largest ``ru_maxrss`` of the method's processes); a figure this run did not measure is null.

Each daemon run and each bare run is its own spawned process, so one method's peak RSS (and
allocator state) does not leak into the next, and the bare model is really a fresh copy. Results
go to ``bench/results/daemon-ops.json`` with the command, machine, git revision and load average
recorded by the same helpers as ``editing/bench.py``; a table goes to stdout.

Usage: ``python bench/daemon_ops.py --methods emsedit,ft --events 1000 --latency-seconds 120
--threads 1``; only the restart: ``--methods ft --restart-edits 100 --restart-only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

# The checkout this script sits in, not whichever one the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.bench import (
    git_revision,
    json_default,
    machine_info,
    percentile,
    seed_everything,
    utc_now_iso,
)
from editing.datasets import DATASETS, DatasetName, load_dataset
from editing.errors import FactkeeperError
from editing.registry import EDITORS
from editing.requests import EditRequest

log = logging.getLogger("daemon_ops")

SnapshotMode = Literal["default", "off"]
SNAPSHOT_MODES: tuple[SnapshotMode, ...] = ("default", "off")
AuditMode = Literal["default", "off"]
DEFAULT_OUT = Path("bench/results/daemon-ops.json")
RSS_TARGET_BYTES = 2 * 1024**3
DRAIN_TARGET_EDITS_PER_S = 5.0
# Sampling period of /proc/self/status VmRSS; ru_maxrss catches what falls between samples.
RSS_SAMPLE_S = 0.2
# How long the daemon may sit idle (partitions held, nothing to consume) before a phase gives up:
# only a safety net, every phase normally ends at its exact message count.
IDLE_TIMEOUT_S = 120.0
#: The restart scenario's stream: this many events per edit to kill at (some edits fail).
RESTART_STREAM_FACTOR = 3
# The consumer's idle timeout does not run before partitions are assigned, so a phase that makes
# no progress at all for this long is stopped with every thread's stack on stderr. A batch that
# falls back to single edits takes well under a minute even on a loaded machine.
STALL_S = 900.0


class OpsBenchError(FactkeeperError):
    """The benchmark's settings are inconsistent, or a phase did not consume what it sent."""


@dataclass(frozen=True)
class OpsConfig:
    """One run of the operations benchmark; checked when built."""

    methods: tuple[str, ...] = ("emsedit", "ft")
    events: int = 1000
    """Corrections queued before the daemon starts (the drain backlog)."""
    latency_seconds: float = 120.0
    """Length of the steady phase; it sends ``ceil(latency_seconds * rate_per_s)`` events."""
    rate_per_s: float = 1.0
    """Steady-phase producer rate."""
    threads: int = 1
    """torch intra-op threads in every worker (1 is fastest on the shared 2-core machine)."""
    model: str = "smollm2"
    dataset: DatasetName = "counterfact"
    snapshots: tuple[SnapshotMode, ...] = ("default",)
    """``default``: the shipped policy (every 100 edits, every 15 min, on shutdown); ``off``."""
    audits: AuditMode = "off"
    """``off`` (issue 6 measures the edit path, audits are their own cost) or ``default``."""
    batch_max_size: int | None = None
    """``batching.max_size``; None keeps the daemon's default."""
    linger_ms: int | None = None
    """``batching.linger_ms``; None keeps the daemon's default."""
    editor_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method, overrides of the editor's config (``editor.options`` in the settings)."""
    bootstrap: str | None = None
    """Reuse a running broker at ``host:port``; None starts a local one on free ports."""
    work_dir: Path | None = None
    """Broker data, journals and MLflow state; None: a temporary folder removed at the end."""
    out: Path = DEFAULT_OUT
    seed: int = 0
    skip_bare: bool = False
    """Leave out the bare-editor runs (then there is no daemon/bare ratio)."""
    restart_edits: int = 0
    """Applied edits a daemon is killed at for the restart scenario; 0 leaves it out."""
    restart_only: bool = False
    """Run only the restart scenario (no drain, steady or bare runs)."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise OpsBenchError("--methods needs at least one method")
        unknown = [m for m in self.methods if m not in EDITORS]
        if unknown:
            raise OpsBenchError(
                f"--methods: unknown {', '.join(unknown)}; known: {', '.join(sorted(EDITORS))}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise OpsBenchError("--methods lists a method twice")
        if self.events < 1 or self.threads < 1:
            raise OpsBenchError("--events and --threads must be >= 1")
        if self.latency_seconds < 0 or self.rate_per_s <= 0:
            raise OpsBenchError("--latency-seconds must be >= 0 and --rate > 0")
        if self.dataset not in DATASETS:
            raise OpsBenchError(f"--dataset must be one of {', '.join(DATASETS)}")
        if not self.snapshots or any(m not in SNAPSHOT_MODES for m in self.snapshots):
            raise OpsBenchError(f"--snapshots takes {', '.join(SNAPSHOT_MODES)} (comma-separated)")
        if self.audits not in ("default", "off"):
            raise OpsBenchError("--audits takes default or off")
        if self.batch_max_size is not None and self.batch_max_size < 1:
            raise OpsBenchError("--batch-size must be >= 1")
        if self.linger_ms is not None and self.linger_ms < 0:
            raise OpsBenchError("--linger-ms must be >= 0")
        if self.restart_edits < 0 or (self.restart_only and not self.restart_edits):
            raise OpsBenchError("--restart-edits must be >= 0, and > 0 with --restart-only")

    @property
    def steady_events(self) -> int:
        return math.ceil(self.latency_seconds * self.rate_per_s)


# -- worker tasks (each runs in its own spawned process) ----------------------------------------


@dataclass(frozen=True)
class DaemonTask:
    """One daemon process: drain a backlog, then take a steady stream."""

    method: str
    snapshots: SnapshotMode
    audits: AuditMode
    home: Path
    bootstrap: str
    topic: str
    drain: tuple[EditRequest, ...]
    steady: tuple[EditRequest, ...]
    rate_per_s: float
    model: str
    threads: int
    seed: int
    batch_max_size: int | None
    linger_ms: int | None
    editor_options: dict[str, Any]
    log_level: str


@dataclass(frozen=True)
class BareTask:
    """One bare-editor process: the drain's requests through ``editor.apply`` only."""

    method: str
    requests: tuple[EditRequest, ...]
    batch_size: int
    model: str
    threads: int
    seed: int
    editor_options: dict[str, Any]
    log_level: str


class RssSampler:
    """Samples this process's VmRSS in a thread and keeps the peak per named phase."""

    def __init__(self, period_s: float = RSS_SAMPLE_S) -> None:
        self.period_s = period_s
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def set_phase(self, phase: str) -> None:
        self._sample()  # close the previous phase with a fresh reading
        self.phase = phase
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def _sample(self) -> None:
        rss = proc_status_bytes("VmRSS")
        if rss is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def report(self) -> dict[str, Any]:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "ru_maxrss_bytes": maxrss,
            "vmhwm_bytes": proc_status_bytes("VmHWM"),
            "vmrss_peak_bytes_by_phase": dict(self.peaks),
            "vmrss_peak_bytes": max(self.peaks.values(), default=None),
            "sample_period_s": self.period_s,
        }


def proc_status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PathTimer:
    """Seconds per stage of the daemon's path, from wrappers on the daemon's own objects.

    Installed on one ``Daemon`` before ``run``: the consumer calls ``applier.apply`` (edit,
    post-check, undo, single retries), then sends rejections to the DLQ, then
    ``journal.record_batch``, then commits offsets and calls ``after_batch`` (which may
    snapshot). So DLQ = journal start - applier end, and commit = after_batch start - journal
    end (offset commit plus metric bookkeeping). Whatever is left of the wall time is polling,
    validation, staging, group joins. Validation is timed by wrapping the consumer module's
    ``parse_event`` in this process only.
    """

    STAGES = (
        "edit",
        "post_check",
        "undo",
        "applier_other",
        "dlq",
        "journal",
        "commit",
        "snapshot",
        "audit",
        "validate",
    )

    def __init__(self, daemon: Any, progress_every: int = 0) -> None:
        self.daemon = daemon
        self.progress_every = progress_every
        self.total = 0
        self.reset()
        self._install()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.editor_calls: Counter[int] = Counter()
        self.undo_calls = 0
        self.flushes: list[dict[str, Any]] = []
        self.first_apply_at: float | None = None
        self.post_checks: list[tuple[int, int]] = []  # (edits checked, edits that did not take)
        self.events_done = 0
        self.last_progress = time.monotonic()
        self._applier_end: float | None = None
        self._journal_end: float | None = None

    def _install(self) -> None:
        import daemon.ingest.consumer as consumer_module

        d = self.daemon
        editor, applier, journal = d.applier.editor, d.applier, d.journal

        def timed(stage: str, func: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return func(*args, **kwargs)
                finally:
                    self.seconds[stage] += time.perf_counter() - started

            return wrapper

        editor_apply = timed("edit", editor.apply)

        def edit(lm: Any, requests: Sequence[EditRequest]) -> Any:
            self.editor_calls[len(requests)] += 1
            return editor_apply(lm, requests)

        editor_undo = timed("undo", editor.undo)

        def undo(lm: Any, result: Any) -> None:
            self.undo_calls += 1
            editor_undo(lm, result)

        applier_apply = applier.apply

        def apply(events: Sequence[Any]) -> Any:
            started = time.perf_counter()
            if self.first_apply_at is None:
                self.first_apply_at = started
            calls_before = sum(self.editor_calls.values())
            inner_before = sum(self.seconds[s] for s in ("edit", "post_check", "undo"))
            outcome = applier_apply(events)
            self._applier_end = time.perf_counter()
            seconds = self._applier_end - started
            inner = sum(self.seconds[s] for s in ("edit", "post_check", "undo")) - inner_before
            self.seconds["applier_other"] += seconds - inner
            calls = sum(self.editor_calls.values()) - calls_before
            self.flushes.append(
                {
                    "events": len(events),
                    "seconds": seconds,
                    "editor_calls": calls,
                    "fell_back": len(events) > 1 and calls > 1,
                    "applied": len(outcome.applied_ids),
                    "failed": len(outcome.failed),
                }
            )
            return outcome

        record_batch = journal.record_batch

        def journal_write(rows: Sequence[Any]) -> Any:
            started = time.perf_counter()
            if self._applier_end is not None:
                self.seconds["dlq"] += started - self._applier_end
                self._applier_end = None
            try:
                return record_batch(rows)
            finally:
                self._journal_end = time.perf_counter()
                self.seconds["journal"] += self._journal_end - started

        after_batch = d._after_batch

        def after(outcome: Any) -> None:
            if self._journal_end is not None:
                self.seconds["commit"] += time.perf_counter() - self._journal_end
                self._journal_end = None
            done_before = self.events_done
            self.events_done += len(outcome.applied_ids) + len(outcome.failed)
            self.last_progress = time.monotonic()
            every = self.progress_every
            if every and self.events_done // every > done_before // every:
                log.info(
                    "progress",
                    extra={"events": self.events_done, "of": self.total, "s": round(self.wall, 1)},
                )
            after_batch(outcome)

        post_check = timed("post_check", applier.post_check)

        def check(requests: Sequence[EditRequest]) -> dict[str, str]:
            failures = post_check(requests)
            self.post_checks.append((len(requests), len(failures)))
            return failures

        editor.apply, editor.undo = edit, undo
        applier.post_check = check
        applier.apply = apply
        journal.record_batch = journal_write
        d._after_batch = after
        if d.versions is not None:
            d.versions.snapshot = timed("snapshot", d.versions.snapshot)
        if hasattr(d, "_between_batches"):  # audits run there, between batches, when due
            d._between_batches = timed("audit", d._between_batches)
        consumer_module.parse_event = timed("validate", consumer_module.parse_event)
        self.start()

    def start(self) -> None:
        self.reset()
        self._run_started = time.perf_counter()
        self._cpu_started = time.process_time()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self._run_started

    def report(self, wall: float) -> dict[str, Any]:
        stages = {s: self.seconds.get(s, 0.0) for s in self.STAGES}
        stages["other"] = max(0.0, wall - sum(stages.values()))
        flush_seconds = [f["seconds"] for f in self.flushes]
        batched = [f for f in self.flushes if f["events"] > 1]
        batch_checks = [(n, bad) for n, bad in self.post_checks if n > 1]
        single_checks = [bad for n, bad in self.post_checks if n == 1]
        cpu = time.process_time() - self._cpu_started
        return {
            "seconds": stages,
            "shares": {k: (v / wall if wall else None) for k, v in stages.items()},
            "cpu_seconds": cpu,
            "cpu_per_wall": cpu / wall if wall else None,
            "post_check_calls": len(self.post_checks),
            "post_check_seconds_per_call": (
                stages["post_check"] / len(self.post_checks) if self.post_checks else None
            ),
            "batch_post_checks": len(batch_checks),
            "batch_post_check_edits_not_taken": [bad for _, bad in batch_checks],
            "single_post_checks": len(single_checks),
            "single_post_checks_not_taken": sum(single_checks),
            "time_to_first_apply_s": (
                self.first_apply_at - self._run_started if self.first_apply_at else None
            ),
            "editor_calls_by_size": {str(k): v for k, v in sorted(self.editor_calls.items())},
            "editor_calls": sum(self.editor_calls.values()),
            "undo_calls": self.undo_calls,
            "flushes": len(self.flushes),
            "flush_events_mean": (
                sum(f["events"] for f in self.flushes) / len(self.flushes) if self.flushes else None
            ),
            "flush_seconds_p50": percentile(flush_seconds, 50),
            "flush_seconds_p95": percentile(flush_seconds, 95),
            "batches_fell_back": sum(f["fell_back"] for f in batched),
            "batches_of_more_than_one": len(batched),
        }


def run_daemon_task(task: DaemonTask) -> dict[str, Any]:
    """Worker entry: one daemon on a fresh journal; drain, then the steady phase."""
    _configure_worker(task.threads, task.seed, task.log_level)
    import torch

    from daemon.config import load_settings
    from daemon.kafka.clients import ensure_topics
    from daemon.kafka.produce import events_from_requests, send
    from daemon.service import Daemon
    from editing.models import load_model
    from editing.paths import Paths

    task.home.mkdir(parents=True, exist_ok=True)
    # Whatever lands relative to the working directory (MLflow's default ./mlruns for a store
    # created without an artifact root) stays in this run's home, not in the checkout.
    os.chdir(task.home)
    with RssSampler() as rss:
        rss.set_phase("load")
        settings = load_settings(_write_settings(task), env=_env(task))
        lm = load_model(
            settings.model.name,
            device=settings.model.device,
            dtype=getattr(torch, settings.model.dtype),
        )
        ensure_topics(settings.kafka)
        rss.set_phase("daemon_init")
        started = time.perf_counter()
        daemon = Daemon(settings, lm=lm, serve_metrics=False, paths=Paths(task.home))
        startup_s = time.perf_counter() - started
        timer = PathTimer(daemon, progress_every=max(1, len(task.drain) // 10))
        try:
            rss.set_phase("drain")
            drain = _drain(daemon, timer, task, settings, events_from_requests, send)
            rss.set_phase("steady")
            steady = _steady(daemon, timer, task, settings) if task.steady else None
            counts = daemon.journal.counts_by_status()
        finally:
            daemon.close()
        rss.set_phase("end")
    return {
        "method": task.method,
        "snapshots": task.snapshots,
        "audits": task.audits,
        "settings": {
            "batching": settings.batching.model_dump(mode="json"),
            "snapshots": settings.snapshots.model_dump(mode="json", exclude={"tracking_uri"}),
            "audit": settings.audit.model_dump(mode="json"),
            "editor": settings.editor.model_dump(mode="json"),
            "model": settings.model.model_dump(mode="json"),
            "journal_synchronous": "FULL (WAL, fsync per batch)",
        },
        "model_load_seconds": lm.load_seconds,
        "daemon_startup_seconds": startup_s,
        "drain": drain,
        "steady": steady,
        "journal_counts": counts,
        "rss": rss.report(),
        "torch_threads": torch.get_num_threads(),
    }


def _drain(
    daemon: Any,
    timer: PathTimer,
    task: DaemonTask,
    settings: Any,
    events_from_requests: Callable[..., list[bytes]],
    send: Callable[..., int],
) -> dict[str, Any]:
    sent = send(settings.kafka, events_from_requests(task.drain, source="bench/daemon-ops"))
    log.info("backlog produced", extra={"method": task.method, "events": sent})
    timer.total = sent
    timer.start()
    with _watchdog(daemon, timer, "drain"):
        stats = daemon.run(max_messages=sent, idle_timeout_s=IDLE_TIMEOUT_S, handle_signals=False)
    wall = timer.wall
    if stats.consumed != sent:
        raise OpsBenchError(f"drain consumed {stats.consumed} of {sent} events")
    entries = [daemon.journal.get(r.request_id) for r in task.drain]
    applied = [e for e in entries if e is not None and e.status == "applied"]
    units = Counter(e.batch_id for e in applied)
    path = timer.report(wall)
    snapshot_s = path["seconds"]["snapshot"]
    after_first = wall - (path["time_to_first_apply_s"] or 0.0)
    return {
        "events": sent,
        "consumed": stats.consumed,
        "results": dict(stats.results),
        "applied": len(applied),
        "failed": sum(1 for e in entries if e is not None and e.status == "failed"),
        "wall_seconds": wall,
        "seconds_per_event": wall / sent,
        "events_per_s": sent / wall,
        "applied_edits_per_s": len(applied) / wall,
        "events_per_s_after_first_apply": sent / after_first if after_first > 0 else None,
        "events_per_s_without_snapshots": sent / (wall - snapshot_s) if wall > snapshot_s else None,
        "units_by_size": {str(k): v for k, v in sorted(Counter(units.values()).items())},
        "journal_edit_seconds_sum": sum(
            {e.batch_id: e.edit_seconds or 0.0 for e in applied}.values()
        ),
        **path,
    }


@contextmanager
def _watchdog(daemon: Any, timer: PathTimer, phase: str) -> Iterator[None]:
    """Stop the daemon's loop (it then closes cleanly) if the phase stalls for ``STALL_S``."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(10.0):
            if time.monotonic() - timer.last_progress > STALL_S:
                log.error(
                    "no event finished for %.0f s; stopping the phase",
                    STALL_S,
                    extra={"phase": phase},
                )
                faulthandler.dump_traceback(all_threads=True)
                if daemon.consumer is not None:
                    daemon.consumer.stop_requested.set()
                return

    thread = threading.Thread(target=watch, name="stall-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _steady(daemon: Any, timer: PathTimer, task: DaemonTask, settings: Any) -> dict[str, Any]:
    """Run the daemon while a thread produces at ``rate_per_s``; latencies from the journal."""
    producer = _PacedProducer(daemon, settings, task.steady, task.rate_per_s)
    timer.total = len(task.steady)
    timer.start()
    producer.start()
    try:
        with _watchdog(daemon, timer, "steady"):
            stats = daemon.run(
                max_messages=len(task.steady), idle_timeout_s=IDLE_TIMEOUT_S, handle_signals=False
            )
    finally:
        producer.join()
    wall = timer.wall
    if stats.consumed != len(task.steady):
        raise OpsBenchError(f"steady phase consumed {stats.consumed} of {len(task.steady)}")
    applied_lat: list[float] = []
    journaled_lat: list[float] = []
    for request in task.steady:
        entry = daemon.journal.get(request.request_id)
        sent_ms = producer.timestamps_ms.get(request.request_id)
        if entry is None or sent_ms is None:
            continue
        journaled_lat.append(entry.received_at.timestamp() - sent_ms / 1000)
        if entry.status == "applied" and entry.applied_at is not None:
            applied_lat.append(entry.applied_at.timestamp() - sent_ms / 1000)
    send_span = producer.last_send_at - producer.first_send_at if producer.first_send_at else 0.0
    half = len(applied_lat) // 2
    return {
        "rate_per_s": task.rate_per_s,
        "sent": len(producer.timestamps_ms),
        "achieved_send_rate_per_s": (
            (len(producer.timestamps_ms) - 1) / send_span if send_span > 0 else None
        ),
        "wait_for_assignment_s": producer.waited_s,
        "consumed": stats.consumed,
        "results": dict(stats.results),
        "applied": len(applied_lat),
        "wall_seconds": wall,
        "latency_applied_s": _summary(applied_lat),
        "latency_journaled_s": _summary(journaled_lat),
        # Rising from the first half of the stream to the second: the daemon falls behind.
        "latency_applied_p50_first_half_s": percentile(applied_lat[:half], 50),
        "latency_applied_p50_second_half_s": percentile(applied_lat[half:], 50),
        "catch_up_seconds_after_last_send": wall - send_span - producer.waited_s,
        "latency_source": "journal applied_at (received_at for all rows) - Kafka CreateTime",
        **timer.report(wall),
    }


class _PacedProducer(threading.Thread):
    """Sends one event every ``1/rate`` s once the daemon holds its partitions."""

    def __init__(
        self, daemon: Any, settings: Any, requests: Sequence[EditRequest], rate: float
    ) -> None:
        super().__init__(name="paced-producer", daemon=True)
        self.daemon_ref = daemon
        self.settings = settings
        self.requests = list(requests)
        self.rate = rate
        self.timestamps_ms: dict[str, int] = {}
        self.waited_s = 0.0
        self.first_send_at: float | None = None
        self.last_send_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        from daemon.ingest.events import encode_event
        from daemon.kafka.clients import build_producer
        from daemon.kafka.produce import event_from_request, record_key

        producer = build_producer(self.settings.kafka)
        topic = self.settings.kafka.topics.corrections
        try:
            began = time.monotonic()
            while not self.daemon_ref.readiness.snapshot().get("partitions_assigned"):
                if time.monotonic() - began > IDLE_TIMEOUT_S:
                    raise OpsBenchError("the daemon got no partitions to consume")
                time.sleep(0.05)
            self.waited_s = time.monotonic() - began
            start = time.monotonic()
            for i, request in enumerate(self.requests):
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                event = event_from_request(request, "bench/daemon-ops", datetime.now(UTC))
                payload = encode_event(event)
                metadata = producer.send(topic, value=payload, key=record_key(payload)).get(30)
                self.timestamps_ms[request.request_id] = metadata.timestamp
                self.last_send_at = time.monotonic()
                if self.first_send_at is None:
                    self.first_send_at = self.last_send_at
        except BaseException as exc:  # re-raised by join() in the main thread
            self.error = exc
        finally:
            producer.close()

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise OpsBenchError(f"the steady producer failed: {self.error}") from self.error


def run_bare_task(task: BareTask) -> dict[str, Any]:
    """Worker entry: the requests through ``editor.apply`` only, on a freshly loaded model."""
    _configure_worker(task.threads, task.seed, task.log_level)
    import torch

    from editing.models import load_model
    from editing.registry import get_editor

    with RssSampler() as rss:
        rss.set_phase("load")
        lm = load_model(task.model)
        editor = get_editor(task.method, **task.editor_options)
        torch.use_deterministic_algorithms(True, warn_only=True)  # as the daemon runs
        rss.set_phase("edit")
        call_seconds: list[float] = []
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(task.requests), task.batch_size):
            batch = task.requests[start : start + task.batch_size]
            t0 = time.perf_counter()
            editor.apply(lm, batch)
            call_seconds.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        rss.set_phase("end")
    n = len(task.requests)
    return {
        "method": task.method,
        "edits": n,
        "batch_size": task.batch_size,
        "calls": len(call_seconds),
        "wall_seconds": wall,
        "edit_seconds_total": sum(call_seconds),
        "cpu_seconds": cpu,
        "cpu_per_wall": cpu / wall if wall else None,
        "edits_per_s": n / wall,
        "seconds_per_edit": wall / n,
        "call_seconds_p50": percentile(call_seconds, 50),
        "call_seconds_p95": percentile(call_seconds, 95),
        "model_load_seconds": lm.load_seconds,
        "rss": rss.report(),
    }


def run_until_killed(task: DaemonTask) -> None:
    """Worker entry of the restart scenario's first daemon: consume until SIGKILL ends it."""
    _configure_worker(task.threads, task.seed, task.log_level)
    from daemon.config import load_settings
    from daemon.service import Daemon
    from editing.paths import Paths

    task.home.mkdir(parents=True, exist_ok=True)
    os.chdir(task.home)
    settings = load_settings(_write_settings(task), env=_env(task))
    daemon = Daemon(settings, serve_metrics=False, paths=Paths(task.home))
    daemon.run(handle_signals=False)  # the orchestrator kills this process mid-stream


@dataclass(frozen=True)
class RestartTask:
    """One restart of a killed daemon: to ready, and with ``first_edit`` to the first batch
    journaled after it."""

    daemon: DaemonTask
    store_deltas: bool
    first_edit: bool


def run_restart_task(task: RestartTask) -> dict[str, Any]:
    """Worker entry: start the killed daemon again, timing from this line (imports included)."""
    started = time.perf_counter()
    d = task.daemon
    _configure_worker(d.threads, d.seed, d.log_level)
    import torch

    from daemon.config import load_settings
    from daemon.service import Daemon
    from editing.models import load_model
    from editing.paths import Paths

    os.chdir(d.home)
    env = {**_env(d), "FACTKEEPER_JOURNAL__STORE_DELTAS": str(task.store_deltas).lower()}
    settings = load_settings(d.home / "factkeeper.yaml", env=env)
    lm = load_model(
        settings.model.name,
        device=settings.model.device,
        dtype=getattr(torch, settings.model.dtype),
    )
    daemon = Daemon(settings, lm=lm, serve_metrics=False, paths=Paths(d.home))
    result: dict[str, Any] = {
        "store_deltas": task.store_deltas,
        "seconds_to_ready": time.perf_counter() - started,
        "model_load_seconds": lm.load_seconds,
        "replay": dataclasses.asdict(daemon.replay),
    }
    try:
        if task.first_edit:
            stats = daemon.run(max_messages=1, idle_timeout_s=IDLE_TIMEOUT_S, handle_signals=False)
            result["seconds_to_first_batch"] = time.perf_counter() - started
            result["first_batch_results"] = dict(stats.results)
    finally:
        daemon.close()
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def run_restart(
    config: OpsConfig,
    method: str,
    requests: Sequence[EditRequest],
    root: Path,
    bootstrap: str,
    run_id: str,
    log_level: str,
) -> dict[str, Any]:
    """The restart scenario for one method (snapshots off: every applied edit replays)."""
    from daemon.config import load_settings
    from daemon.kafka.produce import events_from_requests, send
    from daemon.records.journal import Journal
    from daemon.records.unit_deltas import UnitDeltaStore

    task = DaemonTask(
        method=method,
        snapshots="off",
        audits="off",
        home=root / f"{method}-restart",
        bootstrap=bootstrap,
        topic=f"daemon-ops-{run_id}-{method}-restart",
        drain=tuple(requests),
        steady=(),
        rate_per_s=1.0,
        model=config.model,
        threads=config.threads,
        seed=config.seed,
        batch_max_size=config.batch_max_size,
        linger_ms=config.linger_ms,
        editor_options=dict(config.editor_options.get(method, {})),
        log_level=log_level,
    )
    task.home.mkdir(parents=True, exist_ok=True)
    settings = load_settings(_write_settings(task), env=_env(task))
    sent = send(settings.kafka, events_from_requests(requests, source="bench/daemon-ops"))
    process = multiprocessing.get_context("spawn").Process(target=run_until_killed, args=(task,))
    started = time.perf_counter()
    process.start()
    applied = 0
    try:
        while applied < config.restart_edits:
            if not process.is_alive():
                raise OpsBenchError(f"the daemon to kill exited ({process.exitcode}) first")
            if time.perf_counter() - started > STALL_S * 4:
                raise OpsBenchError(f"{applied} edits applied in {STALL_S * 4:.0f} s; gave up")
            time.sleep(0.2)
            if settings.journal.path.exists():
                with Journal.open(settings.journal.path, create=False) as journal:
                    applied = journal.counts_by_status()["applied"]
    finally:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        process.join()
    with Journal.open(settings.journal.path, create=False) as journal:
        counts = journal.counts_by_status()
    files, size = UnitDeltaStore.beside(settings.journal.path).size()
    log.info("killed", extra={"method": method, "applied": counts["applied"]})
    if counts["applied"] >= sent:
        raise OpsBenchError("the stream ended before the kill: send more events")
    re_edit = _in_fresh_process(run_restart_task, RestartTask(task, False, first_edit=False))
    stored = _in_fresh_process(run_restart_task, RestartTask(task, True, first_edit=True))
    return {
        "events_sent": sent,
        "seconds_to_kill": time.perf_counter() - started,
        "journal_at_kill": counts,
        "stored_deltas_at_kill": {"files": files, "bytes": size},
        "re_edit": re_edit,
        "stored": stored,
    }


def _configure_worker(threads: int, seed: int, log_level: str) -> None:
    import torch

    # A run takes an hour: ``kill -USR1 <worker pid>`` prints every thread's stack to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from daemon.logs import configure_logging

    configure_logging(log_level)
    # A new consumer group logs transient coordinator warnings; MLflow narrates its migrations.
    for name in ("kafka", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("daemon").setLevel(max(logging.WARNING, logging.getLogger().level))
    torch.set_num_threads(threads)
    seed_everything(seed)


def _write_settings(task: DaemonTask) -> Path:
    """The daemon's YAML: editor, batching and snapshot policy (everything else: defaults)."""
    data: dict[str, Any] = {
        "model": {"name": task.model},
        "editor": {"method": task.method, "options": dict(task.editor_options)},
        "batching": {},
        "metrics": {"host": "127.0.0.1"},
    }
    if task.batch_max_size is not None:
        data["batching"]["max_size"] = task.batch_max_size
    if task.linger_ms is not None:
        data["batching"]["linger_ms"] = task.linger_ms
    if task.snapshots == "off":
        data["snapshots"] = {"every_n_edits": 0, "every_minutes": 0.0, "on_shutdown": False}
    if task.audits == "off":
        data["audit"] = {"every_n_edits": 0, "every_minutes": 0.0}
    path = task.home / "factkeeper.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _env(task: DaemonTask) -> dict[str, str]:
    """Kafka and state locations; read instead of ``os.environ`` so nothing leaks in."""
    t = task.topic
    return {
        "FACTKEEPER_HOME": str(task.home),
        "FACTKEEPER_KAFKA__BOOTSTRAP_SERVERS": task.bootstrap,
        "FACTKEEPER_KAFKA__TOPICS__CORRECTIONS": t,
        "FACTKEEPER_KAFKA__TOPICS__DLQ": f"{t}.dlq",
        "FACTKEEPER_KAFKA__TOPICS__CONTROL": f"{t}.control",
        "FACTKEEPER_KAFKA__TOPICS__QUARANTINE": f"{t}.quarantine",
        "FACTKEEPER_KAFKA__GROUP_ID": f"{t}-group",
    }


def _summary(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values, default=None),
        "mean": sum(values) / len(values) if values else None,
    }


# -- the orchestrating process -------------------------------------------------------------------


def run_daemon_ops(
    config: OpsConfig,
    *,
    requests: Sequence[EditRequest] | None = None,
    command: str | None = None,
    log_level: str = "INFO",
) -> dict[str, Any]:
    """Run every method's daemon and bare-editor workers; write the JSON; return its content.

    Args:
        config: what to run.
        requests: the stream (drain first, then the steady phase); default: the dataset's eval
            split, ``events + steady_events`` from its start.
        command: the command line to record (default: this process's argv).
        log_level: level of the workers' stderr logs.
    """
    from daemon.config import load_settings

    started_at, loadavg_start = utc_now_iso(), list(os.getloadavg())
    wall, cpu = time.perf_counter(), time.process_time()
    needed = 0 if config.restart_only else config.events + config.steady_events
    restart_stream = RESTART_STREAM_FACTOR * config.restart_edits
    source = "given" if requests is not None else f"{config.dataset}/eval"
    if requests is None:
        requests = load_dataset(config.dataset, "eval", limit=max(needed, restart_stream))
    if len(requests) < needed:
        raise OpsBenchError(f"{needed} requests needed, {len(requests)} given")
    drain, steady = tuple(requests[: config.events]), tuple(requests[config.events : needed])
    defaults = load_settings(None, env={}).batching
    batch_size = config.batch_max_size or defaults.max_size
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")

    with _work_dir(config.work_dir) as root, _broker(config.bootstrap, root) as (bootstrap, own):
        runs: dict[str, dict[str, Any]] = {}
        restarts: dict[str, dict[str, Any]] = {}
        for method in config.methods:
            if config.restart_edits:
                log.info("restart run", extra={"method": method})
                restarts[method] = run_restart(
                    config, method, requests[:restart_stream], root, bootstrap, run_id, log_level
                )
            if config.restart_only:
                continue
            options = dict(config.editor_options.get(method, {}))
            runs[method] = {"daemon": {}, "bare": None}
            for mode in config.snapshots:
                task = DaemonTask(
                    method=method,
                    snapshots=mode,
                    audits=config.audits,
                    home=root / f"{method}-{mode}",
                    bootstrap=bootstrap,
                    topic=f"daemon-ops-{run_id}-{method}-{mode}",
                    drain=drain,
                    steady=steady,
                    rate_per_s=config.rate_per_s,
                    model=config.model,
                    threads=config.threads,
                    seed=config.seed,
                    batch_max_size=config.batch_max_size,
                    linger_ms=config.linger_ms,
                    editor_options=options,
                    log_level=log_level,
                )
                log.info("daemon run", extra={"method": method, "snapshots": mode})
                runs[method]["daemon"][mode] = _in_fresh_process(run_daemon_task, task)
            if not config.skip_bare:
                bare = BareTask(
                    method=method,
                    requests=drain,
                    batch_size=batch_size,
                    model=config.model,
                    threads=config.threads,
                    seed=config.seed,
                    editor_options=options,
                    log_level=log_level,
                )
                log.info("bare editor run", extra={"method": method})
                runs[method]["bare"] = _in_fresh_process(run_bare_task, bare)
            _add_ratios(runs[method])

    out = {
        "benchmark": "daemon-ops",
        "command": command or " ".join(["python", sys.argv[0], *sys.argv[1:]]),
        "git_rev": git_revision(),
        "started_at": started_at,
        "finished_at": utc_now_iso(),
        "wall_seconds": time.perf_counter() - wall,
        "orchestrator_cpu_seconds": time.process_time() - cpu,
        "machine": {**machine_info(), "torch_threads": config.threads, "ram_bytes": _ram_bytes()},
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "torch_version": importlib.metadata.version("torch"),
        "transformers_version": importlib.metadata.version("transformers"),
        "kafka_python_version": importlib.metadata.version("kafka-python"),
        "broker": {"bootstrap": bootstrap, "started_by_bench": own},
        "config": {
            **dataclasses.asdict(config),
            "steady_events": config.steady_events,
            "batch_max_size": batch_size,
            "linger_ms": config.linger_ms if config.linger_ms is not None else defaults.linger_ms,
        },
        "model": config.model,
        "requests": source,
        "first_request_id": drain[0].request_id,
        "targets": _targets(runs),
        "summary": _method_summary(runs, restarts),
        "methods": runs,
        "restart": restarts,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(out, indent=1, default=json_default) + "\n")
    log.info("written", extra={"path": str(config.out), "seconds": round(out["wall_seconds"])})
    return out


def _in_fresh_process(func: Callable[[Any], dict[str, Any]], task: Any) -> dict[str, Any]:
    """Run one worker in a newly spawned process (its own peak RSS, a fresh model)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(func, task).result()


def _add_ratios(run: dict[str, Any]) -> None:
    bare = run.get("bare")
    for result in run["daemon"].values():
        drain = result["drain"]
        if bare:
            drain["bare_edits_per_s"] = bare["edits_per_s"]
            drain["ratio_events_per_s_daemon_vs_bare"] = drain["events_per_s"] / bare["edits_per_s"]
            drain["ratio_applied_per_s_daemon_vs_bare"] = (
                drain["applied_edits_per_s"] / bare["edits_per_s"]
            )
            # CPU time is what the daemon adds whatever else shares the machine.
            drain["ratio_cpu_seconds_daemon_vs_bare"] = (
                drain["cpu_seconds"] / bare["cpu_seconds"] if bare["cpu_seconds"] else None
            )
            drain["ratio_edit_seconds_daemon_vs_bare"] = (
                drain["seconds"]["edit"] / bare["edit_seconds_total"]
                if bare["edit_seconds_total"]
                else None
            )


def _method_summary(
    runs: dict[str, dict[str, Any]], restarts: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float | None]]:
    """Per method, the issue's documented keys, read off the measurements above."""
    summary = {}
    for method in sorted(set(runs) | set(restarts)):
        run = runs.get(method, {})
        daemon = run.get("daemon", {}).get("default")
        drain = daemon["drain"] if daemon else {}
        restart = restarts.get(method, {}).get("stored", {})
        rss = [
            daemon["rss"]["ru_maxrss_bytes"] if daemon else None,
            run["bare"]["rss"]["ru_maxrss_bytes"] if run.get("bare") else None,
            restart.get("ru_maxrss_bytes"),
        ]
        measured = [r for r in rss if r is not None]
        summary[method] = {
            "drain_applied_per_s": drain.get("applied_edits_per_s"),
            "drain_ratio_vs_bare": drain.get("ratio_applied_per_s_daemon_vs_bare"),
            "restart_to_ready_seconds": restart.get("seconds_to_ready"),
            "peak_rss_bytes": max(measured) if measured else None,
        }
    return summary


def _targets(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 6's targets: >= 5 edits/s drained with EMSEdit, peak RSS <= 2 GiB (every run)."""
    targets: dict[str, Any] = {
        "drain_edits_per_s_min": DRAIN_TARGET_EDITS_PER_S,
        "rss_bytes_max": RSS_TARGET_BYTES,
    }
    for method, run in runs.items():
        for mode, result in run["daemon"].items():
            key = f"{method}/{mode}"
            rss = result["rss"]["ru_maxrss_bytes"]
            targets[key] = {
                "rss_ok": rss <= RSS_TARGET_BYTES,
                "drain_events_per_s_ok": result["drain"]["events_per_s"]
                >= DRAIN_TARGET_EDITS_PER_S,
                "drain_applied_per_s_ok": result["drain"]["applied_edits_per_s"]
                >= DRAIN_TARGET_EDITS_PER_S,
            }
    return targets


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


@contextmanager
def _work_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.absolute()
        return
    root = Path(tempfile.mkdtemp(prefix="factkeeper-daemon-ops-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _broker(bootstrap: str | None, root: Path) -> Iterator[tuple[str, bool]]:
    """A given broker as it is, or a local one on free ports in ``root``, stopped afterwards."""
    if bootstrap is not None:
        yield bootstrap, False
        return
    from daemon.devtools import kafka_broker

    port, controller_port = kafka_broker.free_loopback_ports(2)
    cfg = kafka_broker.LocalBrokerConfig(
        port=port, controller_port=controller_port, data_dir=root / "kafka", startup_timeout_s=90
    )
    status = kafka_broker.start(cfg)
    try:
        yield status.bootstrap, True
    finally:
        kafka_broker.stop(cfg)


# -- output --------------------------------------------------------------------------------------


TABLE_STAGES = ("edit", "post_check", "undo", "journal", "commit", "snapshot", "other")
TABLE_HEADER = (
    "method",
    "snapshots",
    "events",
    "ev/s",
    "applied/s",
    "bare ed/s",
    "daemon/bare",
    "s/event",
    "cpu/wall",
    "applied/failed",
    "fell back",
    "lat p50/p95 s",
    "peak RSS MiB",
    *TABLE_STAGES,
)


def render_table(out: dict[str, Any]) -> str:
    """One row per daemon run: rates, ratio to the bare editor, latency, RSS, stage shares."""
    rows = [TABLE_HEADER, tuple("---" for _ in TABLE_HEADER)]
    for method, run in out["methods"].items():
        bare = run.get("bare")
        for mode, r in run["daemon"].items():
            d = r["drain"]
            lat = (r.get("steady") or {}).get("latency_applied_s") or {}
            rows.append(
                (
                    method,
                    mode,
                    str(d["events"]),
                    f"{d['events_per_s']:.2f}",
                    f"{d['applied_edits_per_s']:.2f}",
                    f"{bare['edits_per_s']:.2f}" if bare else "-",
                    f"{d['ratio_events_per_s_daemon_vs_bare']:.2f}" if bare else "-",
                    f"{d['seconds_per_event']:.2f}",
                    f"{d['cpu_per_wall']:.2f}",
                    f"{d['applied']}/{d['failed']}",
                    f"{d['batches_fell_back']}/{d['batches_of_more_than_one']}",
                    _fmt_pair(lat.get("p50"), lat.get("p95")),
                    f"{r['rss']['ru_maxrss_bytes'] / 2**20:.0f}",
                    *(f"{100 * (d['shares'][k] or 0):.0f}%" for k in TABLE_STAGES),
                )
            )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


RESTART_HEADER = (
    "method",
    "replayed edits/units",
    "re-edit: ready s (replay s)",
    "stored: ready s (replay s)",
    "stored: first batch after s",
    "stored deltas MiB",
)


def render_restart_table(out: dict[str, Any]) -> str:
    """One row per method of the restart scenario: start to ready, re-editing vs stored."""
    rows = [RESTART_HEADER, tuple("---" for _ in RESTART_HEADER)]
    for method, r in out.get("restart", {}).items():
        re_edit, stored = r["re_edit"], r["stored"]
        rows.append(
            (
                method,
                f"{stored['replay']['events']}/{stored['replay']['units']}",
                f"{re_edit['seconds_to_ready']:.1f} ({re_edit['replay']['seconds']:.1f})",
                f"{stored['seconds_to_ready']:.1f} ({stored['replay']['seconds']:.1f})",
                f"{stored['seconds_to_first_batch']:.1f}",
                f"{r['stored_deltas_at_kill']['bytes'] / 2**20:.1f}",
            )
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _fmt_pair(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a:.2f}/{b:.2f}"


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[OpsConfig, str]:
    """The command line as an ``OpsConfig`` and the log level."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="emsedit,ft", help="comma-separated registry names")
    p.add_argument("--events", type=int, default=1000, help="backlog size for the drain")
    p.add_argument("--latency-seconds", type=float, default=120.0, help="steady phase length")
    p.add_argument("--rate", type=float, default=1.0, help="steady events per second")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dataset", default="counterfact", choices=DATASETS)
    p.add_argument(
        "--snapshots", default="default", help="default (shipped policy), off, or default,off"
    )
    p.add_argument("--audits", default="off", choices=("off", "default"), help="audit policy")
    p.add_argument("--batch-size", type=int, default=None, help="batching.max_size override")
    p.add_argument("--linger-ms", type=int, default=None, help="batching.linger_ms override")
    p.add_argument("--bootstrap", default=None, help="reuse a running broker (host:port)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep broker/journal state here")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bare", action="store_true", help="no bare-editor runs")
    p.add_argument(
        "--restart-edits", type=int, default=0, help="kill -9 at this many edits, then restart"
    )
    p.add_argument("--restart-only", action="store_true", help="only the restart scenario")
    p.add_argument("--log-level", default="INFO")
    ns = p.parse_args(argv)
    try:
        config = OpsConfig(
            methods=tuple(m for m in ns.methods.split(",") if m),
            events=ns.events,
            latency_seconds=ns.latency_seconds,
            rate_per_s=ns.rate,
            threads=ns.threads,
            model=ns.model,
            dataset=ns.dataset,
            snapshots=tuple(m for m in ns.snapshots.split(",") if m),  # type: ignore[arg-type]
            audits=ns.audits,
            batch_max_size=ns.batch_size,
            linger_ms=ns.linger_ms,
            bootstrap=ns.bootstrap,
            work_dir=ns.work_dir,
            out=ns.out,
            seed=ns.seed,
            skip_bare=ns.skip_bare,
            restart_edits=ns.restart_edits,
            restart_only=ns.restart_only,
        )
    except OpsBenchError as exc:
        p.error(str(exc))
    return config, ns.log_level


def main(argv: Sequence[str] | None = None) -> int:
    from daemon.logs import configure_logging

    config, log_level = parse_args(argv)
    configure_logging(log_level)
    logging.getLogger("daemon").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(config.threads)
    try:
        out = run_daemon_ops(config, log_level=log_level)
    except FactkeeperError as exc:
        print(f"daemon_ops: {exc}", file=sys.stderr)
        return 1
    if out["methods"]:
        print(render_table(out))
    if out["restart"]:
        print(render_restart_table(out))
    print(f"JSON: {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
