"""The redelivery scenarios of ``long_run.py`` at short sizes, on the session broker."""

from __future__ import annotations

import pytest

from tests.reliability.redelivery import (
    RecreateConfig,
    RedeliveryConfig,
    run_control_redelivery,
    run_topic_recreated,
)

pytestmark = pytest.mark.kafka


def test_a_redelivered_control_record_is_skipped_and_nothing_is_lost(
    kafka_broker, tiny_model_dir, tmp_path
):
    result = run_control_redelivery(
        kafka_broker, tmp_path, tiny_model_dir, RedeliveryConfig(2, 2, 3, 2)
    )
    assert result.failures() == [], result
    assert (result.events_lost, result.applied_twice, result.redelivered_skipped) == (0, 0, 1)


def test_a_recreated_topic_loses_nothing_and_applies_nothing_twice(
    kafka_broker, tiny_model_dir, tmp_path
):
    result = run_topic_recreated(kafka_broker, tmp_path, tiny_model_dir, RecreateConfig(2, 3))
    assert result.failures() == [], result
    assert (result.events_lost, result.applied_twice) == (0, 0)
    assert result.refused_without_flag and result.retired_rows == 2
