"""Moving the model through its history: rollback to a version, revert one edit.

Both keep the journal the single source of truth, so a crash half-way through either is
harmless: the journal is changed first (one transaction), and start-up rebuilds the weights the
journal describes (a version whose edits no longer match the journal is never restored).

* **Rollback** loads a registered version, marks every applied edit the version does not hold
  as ``rolled_back`` (and any edit it holds that was rolled back before as ``applied`` again, so
  rolling *forward* to a newer version re-applies them), and points ``production`` at it. Kafka
  offsets are not touched: the rolled-back events stay consumed, and stay in the journal with
  their payloads. Edits that were ``reverted`` or ``quarantined`` stay out even when the version
  holds them (the weights are rebuilt without them as a new version), unless ``force`` is set.
* **Revert** marks one applied edit ``reverted``, rebuilds from the newest version before it (or
  the base weights) by replaying the later edits without it, and registers the result as a new
  version; if ``production`` held the edit, ``production`` moves to that version, since serving
  replicas and a failed audit's rollback both follow ``production``. The replay is the editor's
  own deterministic re-run, so later edits are recomputed on
  weights that never held the reverted one, not patched by subtracting its delta.
  The edits applied in the same unit as the reverted one (its batch siblings) are recomputed
  without it, so they are post-checked afterwards: if any no longer holds, each sibling becomes
  a unit of its own (in the journal, at its original position) and the rebuild is replayed
  again; a sibling that still does not hold alone is marked ``failed`` with the reason and left
  out by one more rebuild. The revert's report lists both (``resplit``, ``failed``).
  ``revert_many`` removes several edits in one rebuild and one new version: ``remove_restored``
  uses it for the edits of a fact whose newest correction restores its original answer.
  Siblings a newer correction of the same fact superseded are not checked: their answer is no
  longer theirs to hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from daemon.errors import HistoryError
from daemon.ingest.events import FactCorrection
from daemon.records.journal import Journal, JournalEntry
from daemon.versions.keeper import VersionKeeper
from monitoring.metrics import FactkeeperMetrics

log = logging.getLogger(__name__)

Replay = Callable[[int], int]  # replay applied entries after a seq; returns the events replayed
#: Joint rebuild: the live set re-solved from the base weights and registered; returns the version.
Rebuild = Callable[[str], str]
#: Post-check: the events whose new target is not the model's answer, with the reason.
Check = Callable[[list[FactCorrection]], dict[str, str]]

#: Statuses of edits a rollback keeps out of the weights unless forced: an operator or the
#: audit gate removed them on purpose (issue 17, item 6).
KEPT_OUT_STATUSES = frozenset({"reverted", "quarantined"})


@dataclass(frozen=True)
class RollbackReport:
    version: str
    rolled_back: tuple[str, ...]  # applied before, not held by the version
    restored: tuple[str, ...]  # rolled back before, held by the version (roll forward)
    seconds: float
    kept_out: tuple[str, ...] = ()  # held by the version, but reverted or quarantined
    promoted: str | None = None  # the version ``production`` now points at


@dataclass(frozen=True)
class RevertReport:
    event_id: str  # the first of ``event_ids``
    rebuilt_from: str | None  # version replayed from (None: base weights)
    replayed: int
    new_version: str | None
    seconds: float
    promoted: bool = False  # production held the edit and now points at ``new_version``
    resplit: tuple[str, ...] = ()  # batch siblings that lost their edit; now units of their own
    failed: tuple[str, ...] = ()  # of those, the ones that did not hold alone either
    event_ids: tuple[str, ...] = ()  # every edit reverted (``revert_many``)
    consolidated: bool = False  # rebuilt by re-solving the live set (``replayed`` live edits)


class History:
    """Rollback and revert for one daemon's model, journal and registry."""

    def __init__(
        self,
        versions: VersionKeeper,
        journal: Journal,
        replay: Replay,
        metrics: FactkeeperMetrics,
        check: Check | None = None,
        rebuild: Rebuild | None = None,
    ) -> None:
        self.versions = versions
        self.journal = journal
        self.replay = replay
        self.metrics = metrics
        self.check = check
        self.rebuild = rebuild
        """Set (``consolidation.on_removal``): a revert re-solves the live set jointly from the
        base weights instead of replaying every edit after the version before the removed one."""

    def rollback(self, version: str, reason: str, *, force: bool = False) -> RollbackReport:
        """Make ``version`` the model and ``production``; the journal follows it exactly.

        Reverted and quarantined edits the version holds stay out: the weights are rebuilt
        without them and registered as a new version, which ``production`` then points at.
        ``force`` brings them back as ``applied`` instead.

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
        kept_out = (
            [] if force else [i for i in missing if self.journal.get(i).status in KEPT_OUT_STATUSES]
        )
        restored = [i for i in missing if i not in kept_out]
        self.journal.mark_many(
            {
                **dict.fromkeys(dropped, ("rolled_back", f"{reason}: rollback to v{version}")),
                **dict.fromkeys(restored, ("applied", f"{reason}: roll forward to v{version}")),
            }
        )
        self.versions.load(version)
        target: str | None = version
        if kept_out:
            target = self._rebuild_without(
                kept_out, f"{reason}: v{version} without {len(kept_out)} removed edit(s)"
            )
        else:
            self.versions.mark_synced()
        if target is not None:
            self.versions.promote(target)
        self.metrics.rollbacks.labels(reason=reason).inc()
        self.metrics.events.labels(result="rolled_back").inc(len(dropped))
        self.metrics.edits_applied.set(len(held) - len(kept_out))
        report = RollbackReport(
            version,
            tuple(dropped),
            tuple(restored),
            time.perf_counter() - started,
            kept_out=tuple(kept_out),
            promoted=target,
        )
        log.info(
            "rolled back",
            extra={
                "version": version,
                "reason": reason,
                "rolled_back": len(dropped),
                "restored": len(restored),
                "kept_out": len(kept_out),
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
        return self.revert_many([event_id], reason)

    def revert_many(self, event_ids: Sequence[str], reason: str) -> RevertReport:
        """Remove several applied edits' effect in one rebuild, registered as one new version.

        Rebuilds from the newest version before the earliest of them, as ``revert`` does for
        one; their batch siblings are post-checked (and split) the same way.

        Raises:
            HistoryError: no ids, or one is not an applied edit; nothing changed. If the rebuild
                itself fails, the weights and the journal are restored before re-raising.
        """
        started = time.perf_counter()
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            raise HistoryError("nothing to revert")
        entries = [self.journal.get(i) for i in ids]
        for i, entry in zip(ids, entries, strict=True):
            if entry is None or entry.status != "applied":
                state = "unknown" if entry is None else entry.status
                raise HistoryError(f"cannot revert {i!r}: it is not an applied edit ({state})")
        if self.rebuild is not None:
            return self._revert_by_consolidation(ids, reason, started)
        before = self.versions.newest_usable_before(min(e.seq for e in entries))
        saved = {n: p.detach().clone() for n, p in self._editable_params().items()}
        previous_version = self.versions.current_version
        siblings = self._siblings(entries)
        self.journal.mark(ids, "reverted", reason)
        resplit: list[str] = []
        failed: dict[str, str] = {}
        try:
            start_version, start_seq = (before[0], before[1].journal_seq) if before else (None, 0)
            self.versions.load(start_version)
            replayed = self.replay(start_seq)
            lost = self._post_check(siblings)
            if lost:
                # Each sibling alone, where it stood in the journal: what a restart replays.
                resplit = [e.event_id for e in siblings]
                self.journal.set_batch_ids(
                    {e.event_id: f"{e.batch_id}/{e.event_id}" for e in siblings}
                )
                self.versions.load(start_version)
                replayed = self.replay(start_seq)
                failed = self._post_check(siblings)
            if failed:
                note = f"{reason} {', '.join(ids)}: batch sibling no longer holds, even alone: "
                self.journal.mark_many(
                    {i: ("failed", (note + why)[:500]) for i, why in failed.items()}
                )
                self.versions.load(start_version)
                replayed = self.replay(start_seq)
        except Exception:
            with torch.no_grad():
                for name, param in self._editable_params().items():
                    param.copy_(saved[name])
            self.versions.current_version = previous_version
            self.journal.set_batch_ids({e.event_id: e.batch_id for e in siblings})
            self.journal.mark_many(
                {
                    **dict.fromkeys(ids, ("applied", "revert failed; edit kept")),
                    **{i: ("applied", None) for i in failed},
                }
            )
            raise
        if failed:
            self.metrics.events.labels(result="failed").inc(len(failed))
        self.versions.current_version = start_version
        self.versions.snapshot_seq = start_seq
        new_version = self.versions.snapshot(f"revert {', '.join(ids)}"[:250])
        promoted = self._move_production_off(ids, new_version)
        self.metrics.edits_applied.set(len(self.journal.applied_events()))
        report = RevertReport(
            ids[0],
            start_version,
            replayed,
            new_version,
            time.perf_counter() - started,
            promoted=promoted,
            resplit=tuple(resplit),
            failed=tuple(failed),
            event_ids=tuple(ids),
        )
        log.info(
            "reverted",
            extra={
                "event_id": ", ".join(ids),
                "resplit": len(resplit),
                "failed": len(failed),
                "rebuilt_from": start_version or "base",
                "replayed": replayed,
                "version": new_version,
                "seconds": round(report.seconds, 2),
            },
        )
        return report

    def _revert_by_consolidation(self, ids: list[str], reason: str, started: float) -> RevertReport:
        """The removed edits leave the live set, which is re-solved jointly from the base."""
        assert self.rebuild is not None
        saved = {n: p.detach().clone() for n, p in self._editable_params().items()}
        previous_version = self.versions.current_version
        self.journal.mark(ids, "reverted", reason)
        try:
            new_version = self.rebuild(f"revert {', '.join(ids)}"[:250])
        except Exception:
            with torch.no_grad():
                for name, param in self._editable_params().items():
                    param.copy_(saved[name])
            self.versions.current_version = previous_version
            self.journal.mark_many(dict.fromkeys(ids, ("applied", "revert failed; edit kept")))
            raise
        promoted = self._move_production_off(ids, new_version)
        self.metrics.edits_applied.set(len(self.journal.applied_events()))
        report = RevertReport(
            ids[0],
            None,
            len(self.journal.live_events()),
            new_version,
            time.perf_counter() - started,
            promoted=promoted,
            event_ids=tuple(ids),
            consolidated=True,
        )
        log.info(
            "reverted by consolidation",
            extra={
                "event_id": ", ".join(ids),
                "live": report.replayed,
                "version": new_version,
                "seconds": round(report.seconds, 2),
            },
        )
        return report

    def remove_restored(self) -> RevertReport | None:
        """Revert the edits of every fact whose newer correction restored its original answer
        (``Journal.awaiting_removal``), in one rebuild and one version; None when there are none.

        The journal says what to revert until it is done, so a crash or a failure here (raised
        as from ``revert_many``) is caught up by calling this again.
        """
        pending = self.journal.awaiting_removal()
        if not pending:
            return None
        ids = [event_id for edits in pending.values() for event_id in edits]
        reason = f"superseded by {', '.join(pending)}, which restores the original answer"
        report = self.revert_many(ids, reason[:500])
        log.info(
            "original answers restored",
            extra={"restored_by": list(pending), "reverted": ids, "version": report.new_version},
        )
        return report

    def _siblings(self, entries: Sequence[JournalEntry]) -> list[JournalEntry]:
        """The other applied edits of ``entries``' units, in journal order, less those a later
        correction of the same fact superseded (their answer is no longer theirs to hold)."""
        units = {e.batch_id for e in entries if e.batch_id is not None}
        reverted = {e.event_id for e in entries}
        return [
            e
            for e in self.journal.live_events()
            if e.batch_id in units and e.event_id not in reverted
        ]

    def _post_check(self, entries: list[JournalEntry]) -> dict[str, str]:
        if self.check is None or not entries:
            return {}
        return self.check([e.event for e in entries])

    def _move_production_off(self, event_ids: Sequence[str], new_version: str | None) -> bool:
        """Point ``production`` at ``new_version`` if it still holds a reverted edit.

        Otherwise serving replicas keep the edit, and a failed audit's rollback to
        ``production`` would bring it back.
        """
        production = self.versions.production()
        if production is None or new_version is None:
            return False
        _, meta = self.versions.read(production)
        if not set(event_ids) & set(meta.event_ids):
            return False
        self.versions.promote(new_version)
        log.info("production moved off a reverted edit", extra={"version": new_version})
        return True

    def _rebuild_without(self, kept_out: list[str], reason: str) -> str | None:
        """Weights = the applied journal (which no longer counts ``kept_out``), registered.

        Rebuilds from the newest usable version before the earliest kept-out edit, replays the
        applied edits after it and snapshots the result; returns the version now loaded.
        """
        first = min(self.journal.get(i).seq for i in kept_out)
        before = self.versions.newest_usable_before(first)
        start_version, start_seq = (before[0], before[1].journal_seq) if before else (None, 0)
        self.versions.load(start_version)
        self.replay(start_seq)
        self.versions.current_version = start_version
        self.versions.snapshot_seq = start_seq
        return self.versions.snapshot(reason) or start_version

    def _editable_params(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.versions.lm.model.named_parameters())
        return {n: params[n] for n in self.versions.names}
