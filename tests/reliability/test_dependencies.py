"""Topics created after start, MLflow down (issue 17), at short sizes; the bench runs them long."""

from __future__ import annotations

import pytest

from tests.reliability.dependencies import (
    MlflowDownConfig,
    TopicsLateConfig,
    run_mlflow_down,
    run_topics_late,
)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_topics_created_after_start_lose_nothing(tiny_model_dir, tmp_path):
    result = run_topics_late(
        tmp_path, tiny_model_dir, TopicsLateConfig(events=6, produce_after_s=3)
    )
    assert result.failures() == [], result.to_dict()
    assert result.all_journaled_after_produce_s < 30


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_mlflow_down_mid_stream_loses_nothing_and_recovers(tiny_model_dir, tmp_path):
    config = MlflowDownConfig(events=15, down_s=10.0, snapshot_every=2)
    result = run_mlflow_down(tmp_path, tiny_model_dir, config)
    assert result.failures() == [], result.to_dict()
    assert result.snapshot_failures_total and result.snapshot_failures_total >= 1
    assert result.journaled_while_down and result.journaled_while_down > 0
