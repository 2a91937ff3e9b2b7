"""Audit triggers: edit counts, the APScheduler timer, requests, resets, shutdown."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from daemon.audits.schedule import EDITS, REQUESTED, TIMER, AuditSchedule
from daemon.config import AuditSettings

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def schedules() -> Iterator[list[AuditSchedule]]:
    made: list[AuditSchedule] = []
    yield made
    for schedule in made:
        schedule.shutdown()


def _wait_until_due(schedule: AuditSchedule, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if schedule.due():
            return True
        time.sleep(0.01)
    return False


def test_edit_count_triggers_at_n_and_resets_when_taken() -> None:
    schedule = AuditSchedule(every_n_edits=5, every_minutes=0)
    schedule.note_applied(3)
    assert not schedule.due() and schedule.take() is None
    schedule.note_applied(2)
    assert schedule.due()
    assert schedule.take() == EDITS
    assert schedule.applied_since_audit == 0
    assert not schedule.due() and schedule.take() is None
    schedule.note_applied(4)
    assert not schedule.due()


def test_zero_disables_the_edit_trigger_and_the_timer(schedules: list[AuditSchedule]) -> None:
    schedule = AuditSchedule(every_n_edits=0, every_minutes=0)
    schedules.append(schedule)
    schedule.start()
    assert not schedule.running  # no timer thread at all
    schedule.note_applied(10_000)
    assert not schedule.due()
    schedule.request()
    assert schedule.take() == REQUESTED


def test_the_timer_fires_and_restarts_after_an_audit(schedules: list[AuditSchedule]) -> None:
    schedule = AuditSchedule(every_n_edits=0, every_minutes=0.2 / 60)  # 0.2 s
    schedules.append(schedule)
    assert not schedule.due()
    schedule.start()
    assert schedule.running
    assert _wait_until_due(schedule)
    assert schedule.take() == TIMER
    assert not schedule.due()
    assert _wait_until_due(schedule)  # it keeps firing
    schedule.shutdown()
    schedule.take()
    time.sleep(0.5)
    assert not schedule.due()  # and stops with the scheduler


def test_the_timer_job_is_coalesced_without_overlap(schedules: list[AuditSchedule]) -> None:
    schedule = AuditSchedule(every_n_edits=0, every_minutes=30)
    schedules.append(schedule)
    schedule.start()
    assert schedule._scheduler is not None
    (job,) = schedule._scheduler.get_jobs()
    assert job.coalesce is True
    assert job.max_instances == 1
    assert job.misfire_grace_time >= 30 * 60
    assert job.trigger.interval.total_seconds() == 30 * 60


def test_a_request_wins_and_one_take_clears_every_trigger() -> None:
    schedule = AuditSchedule(every_n_edits=2, every_minutes=0)
    schedule.note_applied(7)
    schedule.request()
    assert schedule.take() == REQUESTED
    assert schedule.take() is None  # the edits were covered by that audit


def test_start_and_shutdown_are_idempotent() -> None:
    schedule = AuditSchedule(every_n_edits=1, every_minutes=10)
    schedule.shutdown()  # before start
    schedule.start()
    schedule.start()
    assert schedule.running
    schedule.shutdown()
    schedule.shutdown()
    assert not schedule.running
    schedule.note_applied(1)
    assert schedule.take() == EDITS  # counting does not need the thread


def test_settings_and_bad_arguments() -> None:
    schedule = AuditSchedule.from_settings(AuditSettings(every_n_edits=7, every_minutes=2.5))
    assert (schedule.every_n_edits, schedule.every_minutes) == (7, 2.5)
    with pytest.raises(ValueError):
        AuditSchedule(every_n_edits=-1, every_minutes=0)
    with pytest.raises(ValueError):
        schedule.note_applied(-1)
