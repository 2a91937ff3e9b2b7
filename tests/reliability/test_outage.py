"""Broker outage (issue 9): the broker stops mid-stream and comes back on the same data dir."""

from __future__ import annotations

import pytest

from tests.reliability.outage import OutageConfig, run_outage

#: The short version run in CI; ``tests/reliability/long_run.py`` runs a 30 s outage.
SHORT = OutageConfig(events=60, outage_s=10.0, stop_after=15)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_daemon_survives_a_broker_outage_and_applies_every_event_once(tiny_model_dir, tmp_path):
    result = run_outage(tmp_path, tiny_model_dir, SHORT)

    assert result.failures() == [], result.to_dict()
    assert result.broker_down_s >= SHORT.outage_s
    assert result.not_ready_after_s is not None and result.not_ready_samples_while_down > 0
    assert result.ready_again_after_s is not None
    assert result.exit_code == 0
