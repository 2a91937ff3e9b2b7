"""Crash anywhere (issue 9): kill -9 at seeded points, restart, compare with a clean run."""

from __future__ import annotations

import pytest

from tests.reliability.crash import CrashConfig, run_crash
from tests.reliability.observe import offsets_ahead

#: The short version run in CI; ``tests/reliability/long_run.py`` runs 1 000 events and 10 kills.
SHORT = CrashConfig(events=150, kills=3, seed=0)


def test_kill_plan_is_seeded_increasing_and_inside_the_stream():
    plan = SHORT.kill_plan()
    assert plan == CrashConfig(events=150, kills=3, seed=0).kill_plan()
    assert plan != CrashConfig(events=150, kills=3, seed=1).kill_plan()
    thresholds = [t for t, _ in plan]
    assert thresholds == sorted(set(thresholds)) and len(thresholds) == 3
    assert thresholds[0] > 0 and thresholds[-1] < 150
    assert all(0 <= delay <= SHORT.max_kill_delay_s for _, delay in plan)


def test_a_committed_offset_ahead_of_the_journal_is_flagged():
    assert offsets_ahead({0: 10, 1: None}, {0: 9}) == []  # commit trails or matches the journal
    assert offsets_ahead({0: 7}, {0: 9}) == []
    assert offsets_ahead({0: 11}, {0: 9}) == ["partition 0: committed 11 > journaled + 1 = 10"]
    assert offsets_ahead({1: 1}, {}) == ["partition 1: committed 1 > journaled + 1 = 0"]


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_9_anywhere_then_restart_equals_an_uninterrupted_run(
    kafka_broker, tiny_model_dir, tmp_path
):
    result = run_crash(kafka_broker, tmp_path, tiny_model_dir, SHORT)

    assert result.failures() == [], result.to_dict()
    assert [k.threshold for k in result.kills] == [t for t, _ in SHORT.kill_plan()]
    assert all(k.journaled >= k.threshold for k in result.kills)
    assert result.weights_exactly_equal and result.max_abs_diff == 0.0
    assert result.statuses.get("applied", 0) > 0  # edits really happened and were compared
