"""Soak (issue 9): drain a backlog; RSS, threads and fds must level off after warm-up."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from tests.reliability.observe import ProcSample
from tests.reliability.soak import SoakConfig, SoakResult, _judge, run_soak

#: The short version run in CI; ``tests/reliability/long_run.py`` drains 10 000 events.
SHORT = SoakConfig(events=1000)


def _samples(rss_mib: list[float], threads: int = 6, fds: int = 16) -> list[ProcSample]:
    step = SHORT.events // len(rss_mib)
    return [
        ProcSample(float(i), int(mib * 2**20), threads, fds, i * step)
        for i, mib in enumerate(rss_mib)
    ]


def _judged(samples: list[ProcSample]) -> SoakResult:
    result = SoakResult(
        config=asdict(SHORT), exit_code=0, consumed=SHORT.events, journal_rows=SHORT.events
    )
    _judge(result, samples, SHORT)
    return result


def test_the_judge_accepts_a_flat_series_and_flags_growth_and_leaks():
    flat = _judged(_samples([400.0] * 100))
    assert flat.failures() == [] and flat.rss_growth == 0.0

    growing = _judged(_samples([400.0 + i for i in range(100)]))  # +1 MiB per 10 events
    assert growing.rss_growth > SHORT.max_rss_growth
    assert any("RSS grew" in f for f in growing.failures())

    leaking = _samples([400.0] * 100)
    leaking[-10:] = [replace(s, threads=s.threads + 1, fds=s.fds + 3) for s in leaking[-10:]]
    assert {f.split()[0] for f in _judged(leaking).failures()} == {"threads", "open"}


def test_a_file_open_for_a_moment_is_not_a_leak():
    """One sample catching a stored-deltas write (one more fd) at the end is not a leak."""
    samples = _samples([400.0] * 100)
    samples[-3] = replace(samples[-3], fds=samples[-3].fds + 1)
    result = _judged(samples)
    assert result.fds_final_max == result.fds_baseline_max + 1
    assert result.failures() == []


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_draining_a_backlog_keeps_memory_threads_and_fds_flat(
    kafka_broker, tiny_model_dir, tmp_path
):
    result = run_soak(kafka_broker, tmp_path, tiny_model_dir, SHORT)

    assert result.failures() == [], {k: v for k, v in result.to_dict().items() if k != "series"}
    assert result.rss_growth is not None and result.rss_growth <= SHORT.max_rss_growth
    assert result.threads_final_max <= result.threads_baseline_max
    assert result.fds_final_min <= result.fds_baseline_max
