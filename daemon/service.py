"""The daemon process: load the model, rebuild its edits, consume, snapshot, serve metrics.

Start-up is the recipe of the design's "exactly-once effect": the model is the newest usable
snapshot (an MLflow version) plus a deterministic replay of the applied journal entries after
it, unit by unit in journal order; only then does the consumer resume from the committed
offsets. Replay re-runs the editor instead of loading stored deltas, so it needs editing to be
deterministic on CPU (the editors' tests check that).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from types import FrameType

import torch

from daemon.applier import BatchOutcome, EditApplier
from daemon.config import Settings
from daemon.consumer import ControlHandler, FactConsumer, RunStats
from daemon.journal import Journal, JournalEntry
from daemon.kafka_clients import build_consumer, build_producer
from daemon.versions import VersionKeeper
from editing.editors import Editor, get_editor
from editing.models import LoadedModel, load_model
from editing.paths import Paths
from monitoring.http import MetricsServer, Readiness
from monitoring.metrics import FactkeeperMetrics

log = logging.getLogger(__name__)

READINESS_CONDITIONS = ("model_loaded", "partitions_assigned")


@dataclass(frozen=True)
class ReplayReport:
    units: int
    events: int
    seconds: float


def snapshots_enabled(settings: Settings) -> bool:
    """Versioning is off when no trigger is set (every_n_edits, every_minutes, on_shutdown)."""
    s = settings.snapshots
    return s.every_n_edits > 0 or s.every_minutes > 0 or s.on_shutdown


def replay_units(entries: list[JournalEntry]) -> Iterator[tuple[str, list[JournalEntry]]]:
    """Applied entries grouped into the units they were applied in, in journal order."""
    for batch_id, group in groupby(entries, key=lambda e: e.batch_id or f"seq-{e.seq}"):
        yield batch_id, list(group)


def replay_journal(applier: EditApplier, journal: Journal, after_seq: int = 0) -> ReplayReport:
    """Re-apply every applied journal entry after ``after_seq`` to the model in ``applier``."""
    started = time.perf_counter()
    entries = journal.applied_events(after_seq)
    units = 0
    for batch_id, group in replay_units(entries):
        applier.replay(batch_id, [e.event for e in group])
        units += 1
    report = ReplayReport(units, len(entries), time.perf_counter() - started)
    log.info(
        "journal replayed",
        extra={"units": units, "events": len(entries), "seconds": round(report.seconds, 2)},
    )
    return report


class Daemon:
    """One model, one editor, one journal, one consumer group member."""

    def __init__(
        self,
        settings: Settings,
        *,
        lm: LoadedModel | None = None,
        editor: Editor | None = None,
        metrics: FactkeeperMetrics | None = None,
        serve_metrics: bool = True,
        paths: Paths | None = None,
    ) -> None:
        self.settings = settings
        self.paths = paths or Paths.from_env()
        self.metrics = metrics or FactkeeperMetrics()
        self.readiness = Readiness(*READINESS_CONDITIONS)
        self._server: MetricsServer | None = None
        if serve_metrics:
            m = settings.metrics
            self._server = MetricsServer(self.metrics.registry, self.readiness, m.host, m.port)
            self._server.start()
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.lm = lm or load_model(
            settings.model.name,
            paths=self.paths,
            device=settings.model.device,
            dtype=getattr(torch, settings.model.dtype),
        )
        self.editor = editor or get_editor(settings.editor.method, **settings.editor.options)
        self.applier = EditApplier(self.lm, self.editor)
        settings.journal.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal = Journal.open(settings.journal.path)
        self.versions = (
            VersionKeeper(settings, self.lm, self.journal, self.metrics)
            if (snapshots_enabled(settings))
            else None
        )
        self.restored = self.versions.restore() if self.versions else None
        after_seq = self.restored.journal_seq if self.restored else 0
        self.replay = replay_journal(self.applier, self.journal, after_seq=after_seq)
        self.metrics.edits_applied.set(len(self.journal.applied_events()))
        version = self.restored.version if self.restored and self.restored.version else "base"
        self.metrics.set_model_version(version, self.lm.name)
        self.readiness.set("model_loaded", True)
        self.consumer: FactConsumer | None = None
        self._applied_since_snapshot = self.replay.events

    def run(
        self,
        *,
        max_messages: int | None = None,
        idle_timeout_s: float | None = None,
        on_control: ControlHandler | None = None,
        handle_signals: bool = True,
    ) -> RunStats:
        """Consume until SIGTERM/SIGINT (or the test limits); always closes the clients."""
        consumer = FactConsumer(
            self.settings,
            self.applier,
            self.journal,
            build_consumer(self.settings.kafka),
            build_producer(self.settings.kafka),
            self.metrics,
            self.readiness,
            on_control=on_control,
            after_batch=self._after_batch,
        )
        self.consumer = consumer
        previous = self._install_signals(consumer) if handle_signals else {}
        try:
            stats = consumer.run(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
            if self.versions is not None and self.settings.snapshots.on_shutdown:
                self.versions.snapshot("shutdown")
            return stats
        finally:
            consumer.close()
            self.readiness.set("partitions_assigned", False)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _after_batch(self, outcome: BatchOutcome) -> None:
        applied = len(outcome.applied_ids)
        self.metrics.edits_applied.inc(applied)
        self._applied_since_snapshot += applied
        if self.versions is not None and self.versions.due(self._applied_since_snapshot):
            self.versions.snapshot("schedule")
            self._applied_since_snapshot = 0

    def close(self) -> None:
        self.journal.close()
        if self._server is not None:
            self._server.stop()

    def _install_signals(self, consumer: FactConsumer) -> dict[int, object]:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
            consumer.stop_requested.set()

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
        return previous
