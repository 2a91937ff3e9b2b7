"""When the next audit is due: every N applied edits, every T minutes, or on request.

Only the daemon's main loop touches the model, and it runs an audit between batches. So the
timer here never audits anything: APScheduler's interval job (coalesced, one instance, generous
misfire grace) only raises a flag, and the loop asks ``due()`` / ``take()`` between batches.
A missed or late tick therefore costs nothing, and ticks that pile up while an audit runs
collapse into one. Taking an audit resets every trigger, the edit count and the timer, so an
audit caused by edits is not followed a moment later by one caused by the clock.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

if TYPE_CHECKING:
    from daemon.config import AuditSettings

log = logging.getLogger(__name__)

EDITS = "edits"
TIMER = "timer"
REQUESTED = "requested"
SCHEDULE_TRIGGERS = (REQUESTED, EDITS, TIMER)
"""What ``take`` returns, in the order it prefers them when several are due."""

_JOB_ID = "factkeeper-audit-timer"
_MIN_GRACE_SECONDS = 60  # APScheduler wants whole seconds


class AuditSchedule:
    """Audit triggers, shared between the main loop and the scheduler thread."""

    def __init__(self, every_n_edits: int, every_minutes: float) -> None:
        """
        Args:
            every_n_edits: audit once this many edits were applied since the last audit;
                0 disables the trigger.
            every_minutes: audit when this long has passed since the last audit (or start);
                0 disables the timer.
        """
        if every_n_edits < 0 or every_minutes < 0:
            raise ValueError("every_n_edits and every_minutes must be >= 0 (0 disables)")
        self.every_n_edits = every_n_edits
        self.every_minutes = every_minutes
        self._lock = threading.Lock()
        self._applied = 0
        self._timer_due = False
        self._requested = False
        self._scheduler: BackgroundScheduler | None = None

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> AuditSchedule:
        return cls(settings.every_n_edits, settings.every_minutes)

    @property
    def interval_seconds(self) -> float:
        return self.every_minutes * 60.0

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    @property
    def applied_since_audit(self) -> int:
        with self._lock:
            return self._applied

    def note_applied(self, n: int) -> None:
        """Count ``n`` more applied edits (call after each batch is journaled)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._applied += n

    def request(self) -> None:
        """Ask for an audit at the next opportunity (the ``audit`` control command)."""
        with self._lock:
            self._requested = True

    def due(self) -> bool:
        """Whether any trigger has fired since the last ``take``."""
        with self._lock:
            return self._due_trigger() is not None

    def take(self) -> str | None:
        """The trigger of the audit to run now (``requested``, ``edits`` or ``timer``), or None.

        Resets every trigger, the edit count and the timer: one audit covers them all.
        """
        with self._lock:
            trigger = self._due_trigger()
            if trigger is None:
                return None
            self._applied = 0
            self._timer_due = False
            self._requested = False
        self._restart_timer()
        log.info("audit due", extra={"trigger": trigger})
        return trigger

    def start(self) -> None:
        """Start the timer thread (no thread when the timer is disabled); idempotent."""
        if self.running or self.every_minutes == 0:
            return
        scheduler = BackgroundScheduler(daemon=True, timezone="UTC")
        scheduler.add_job(
            self._on_timer,
            "interval",
            seconds=self.interval_seconds,
            id=_JOB_ID,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=math.ceil(max(_MIN_GRACE_SECONDS, self.interval_seconds)),
        )
        scheduler.start()
        self._scheduler = scheduler
        log.info("audit timer started", extra={"every_minutes": self.every_minutes})

    def shutdown(self) -> None:
        """Stop the timer thread; safe to call twice or before ``start``."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None and scheduler.running:
            scheduler.shutdown(wait=True)

    def _due_trigger(self) -> str | None:
        if self._requested:
            return REQUESTED
        if self.every_n_edits and self._applied >= self.every_n_edits:
            return EDITS
        if self._timer_due:
            return TIMER
        return None

    def _on_timer(self) -> None:
        with self._lock:
            self._timer_due = True

    def _restart_timer(self) -> None:
        """Count the next interval from now."""
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            scheduler.reschedule_job(_JOB_ID, trigger="interval", seconds=self.interval_seconds)


__all__ = ["EDITS", "REQUESTED", "SCHEDULE_TRIGGERS", "TIMER", "AuditSchedule"]
