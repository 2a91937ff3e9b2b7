"""Moving the model through its history: rollback to a version, revert one edit.

Both keep the journal the single source of truth, so a crash half-way through either is
harmless: the journal is changed first (one transaction), and start-up rebuilds the weights the
journal describes (a version whose edits no longer match the journal is never restored).

* **Rollback** loads a registered version, marks every applied edit the version does not hold
  as ``rolled_back`` (and any edit it holds that was rolled back before as ``applied`` again, so
  rolling *forward* to a newer version re-applies them), and points ``production`` at it. Kafka
  offsets are not touched: the rolled-back events stay consumed, and stay in the journal with
  their payloads.
* **Revert** marks one applied edit ``reverted``, rebuilds from the newest version before it (or
  the base weights) by replaying the later edits without it, and registers the result as a new
  version. The replay is the editor's own deterministic re-run, so later edits are recomputed on
  weights that never held the reverted one, not patched by subtracting its delta.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from daemon.errors import HistoryError
from daemon.journal import Journal
from daemon.versions import VersionKeeper
from monitoring.metrics import FactkeeperMetrics

log = logging.getLogger(__name__)

Replay = Callable[[int], int]  # replay applied entries after a seq; returns the events replayed


@dataclass(frozen=True)
class RollbackReport:
    version: str
    rolled_back: tuple[str, ...]  # applied before, not held by the version
    restored: tuple[str, ...]  # rolled back before, held by the version (roll forward)
    seconds: float


@dataclass(frozen=True)
class RevertReport:
    event_id: str
    rebuilt_from: str | None  # version replayed from (None: base weights)
    replayed: int
    new_version: str | None
    seconds: float


class History:
    """Rollback and revert for one daemon's model, journal and registry."""

    def __init__(
        self,
        versions: VersionKeeper,
        journal: Journal,
        replay: Replay,
        metrics: FactkeeperMetrics,
    ) -> None:
        self.versions = versions
        self.journal = journal
        self.replay = replay
        self.metrics = metrics

    def rollback(self, version: str, reason: str) -> RollbackReport:
        """Make ``version`` the model and ``production``; the journal follows it exactly.

        Raises:
            HistoryError: the version does not exist or was made from other base weights.
        """
        started = time.perf_counter()
        try:
            tensors, meta = self.versions.read(version)
        except Exception as exc:  # registry and snapshot errors carry their own message
            raise HistoryError(f"cannot roll back to version {version}: {exc}") from exc
        held = set(meta.event_ids)
        applied = {e.event_id for e in self.journal.applied_events()}
        dropped = sorted(applied - held)
        missing = sorted(held - applied)
        unknown = [i for i in missing if self.journal.get(i) is None]
        if unknown:
            raise HistoryError(
                f"version {version} holds edits this journal never saw: {unknown[:3]}"
            )
        self.journal.mark_many(
            {
                **dict.fromkeys(dropped, ("rolled_back", f"{reason}: rollback to v{version}")),
                **dict.fromkeys(missing, ("applied", f"{reason}: roll forward to v{version}")),
            }
        )
        self.versions.load(version)
        self.versions.mark_synced()
        self.versions.promote(version)
        self.metrics.rollbacks.labels(reason=reason).inc()
        self.metrics.events.labels(result="rolled_back").inc(len(dropped))
        self.metrics.edits_applied.set(len(held))
        report = RollbackReport(
            version, tuple(dropped), tuple(missing), time.perf_counter() - started
        )
        log.info(
            "rolled back",
            extra={
                "version": version,
                "reason": reason,
                "rolled_back": len(dropped),
                "restored": len(missing),
                "seconds": round(report.seconds, 2),
            },
        )
        return report

    def revert(self, event_id: str, reason: str = "revert") -> RevertReport:
        """Remove one applied edit's effect; the result is registered as a new version.

        Raises:
            HistoryError: the event is not an applied edit; nothing changed. If the rebuild
                itself fails, the weights and the journal are restored before re-raising.
        """
        started = time.perf_counter()
        entry = self.journal.get(event_id)
        if entry is None or entry.status != "applied":
            state = "unknown" if entry is None else entry.status
            raise HistoryError(f"cannot revert {event_id!r}: it is not an applied edit ({state})")
        before = self.versions.newest_usable_before(entry.seq)
        saved = {n: p.detach().clone() for n, p in self._editable_params().items()}
        previous_version = self.versions.current_version
        self.journal.mark([event_id], "reverted", reason)
        try:
            start_version, start_seq = (before[0], before[1].journal_seq) if before else (None, 0)
            self.versions.load(start_version)
            replayed = self.replay(start_seq)
        except Exception:
            with torch.no_grad():
                for name, param in self._editable_params().items():
                    param.copy_(saved[name])
            self.versions.current_version = previous_version
            self.journal.mark([event_id], "applied", "revert failed; edit kept")
            raise
        self.versions.current_version = start_version
        self.versions.snapshot_seq = start_seq
        new_version = self.versions.snapshot(f"revert {event_id}")
        self.metrics.edits_applied.set(len(self.journal.applied_events()))
        report = RevertReport(
            event_id, start_version, replayed, new_version, time.perf_counter() - started
        )
        log.info(
            "reverted",
            extra={
                "event_id": event_id,
                "rebuilt_from": start_version or "base",
                "replayed": replayed,
                "version": new_version,
                "seconds": round(report.seconds, 2),
            },
        )
        return report

    def _editable_params(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.versions.lm.model.named_parameters())
        return {n: params[n] for n in self.versions.names}
