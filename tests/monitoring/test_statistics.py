"""The audit statistics: the age-stratified sample, the Wilson interval, figures from outcomes."""

from __future__ import annotations

import pytest

from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    PerplexityFigures,
    RetentionFigures,
    stratified_sample,
    wilson_interval,
)


def test_stratified_sample_covers_every_age_band_and_is_seeded() -> None:
    picks = stratified_sample(1000, 100, seed=0)
    assert len(picks) == len(set(picks)) == 100 and picks == sorted(picks)
    assert [sum(lo <= i < lo + 100 for i in picks) for lo in range(0, 1000, 100)] == [10] * 10
    assert stratified_sample(1000, 100, seed=0) == picks
    assert stratified_sample(1000, 100, seed=1) != picks
    uneven = stratified_sample(23, 7, seed=0)
    assert len(set(uneven)) == 7 and all(0 <= i < 23 for i in uneven)
    assert stratified_sample(5, 10, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        stratified_sample(5, 0, seed=0)


def test_wilson_interval_matches_published_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(91, 100) == pytest.approx((0.8377, 0.9519), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_figures_are_shares_of_outcomes_and_none_where_nothing_was_checked() -> None:
    retention = RetentionFigures.of([True, True, False, True], [1.0, 0.5, 0.0, 1.0])
    assert (retention.exact_match, retention.token_accuracy) == (0.75, 0.625)
    assert retention.ci95 == wilson_interval(3, 4)
    assert RetentionFigures.of([], []) == RetentionFigures(None, None, None)
    assert GeneralisationFigures.of([]) == GeneralisationFigures(None, 0)
    assert LocalityFigures.of([True, False], [True, True]) == LocalityFigures(0.5, 1.0, 2)
    with pytest.raises(ValueError, match="per probe"):
        LocalityFigures.of([True], [True, False])
    assert PerplexityFigures.of(10.0, 12.5) == PerplexityFigures(10.0, 12.5, 0.25)
