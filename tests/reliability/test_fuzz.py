"""Poison and fuzz (issue 9): malformed records go to the DLQ with a reason, valid ones apply.

Determinism: the broker test's stream is drawn with ``random.Random(seed)`` by
``malformed.fuzz_stream``; the property test drives the same generators through hypothesis's
``st.randoms(use_true_random=False)`` with ``derandomize=True``, so CI sees the same examples.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import InvalidEventError
from daemon.ingest.events import encode_event, parse_event
from tests.reliability.fuzz import FuzzConfig, run_fuzz
from tests.reliability.malformed import KINDS, fuzz_stream, malformed, valid_event

#: The short version run in CI; ``tests/reliability/long_run.py`` runs 1 000 malformed records.
SHORT = FuzzConfig(malformed=200, valid=50, seed=0)


@settings(
    derandomize=True,
    database=None,
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    rng=st.randoms(use_true_random=False),
    index=st.integers(0, 10**6),
)
def test_every_malformed_kind_gets_the_reason_it_was_built_for(kind, rng, index):
    earlier = [valid_event(index + 1, rng)]
    item = malformed(kind, rng, index, earlier)
    if kind == "conflicting-duplicate":  # well-formed on its own; only the journal can tell
        event = parse_event(item.payload)
        original = parse_event(json.dumps(earlier[0]).encode())
        assert event.id == original.id and encode_event(event) != encode_event(original)
        return
    with pytest.raises(InvalidEventError) as rejected:
        parse_event(item.payload)
    assert rejected.value.reason_code in item.reasons, (kind, item.payload[:200])


def test_valid_events_with_hostile_looking_text_parse():
    rng = random.Random(0)
    for i in range(200):
        event = parse_event(json.dumps(valid_event(i, rng)).encode())
        assert event.subject in event.prompt


def test_the_fuzz_stream_is_deterministic_and_covers_every_kind():
    stream = fuzz_stream(7, malformed_count=60, valid_count=10)
    assert stream == fuzz_stream(7, malformed_count=60, valid_count=10)
    assert stream != fuzz_stream(8, malformed_count=60, valid_count=10)
    assert len(stream) == 70 and stream[0].kind == "valid"
    assert {item.kind for item in stream if item.malformed} == set(KINDS)
    assert sum(item.malformed for item in stream) == 60


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_malformed_records_reach_the_dlq_with_their_reason_and_valid_ones_apply(
    kafka_broker, tiny_model_dir, tmp_path
):
    result = run_fuzz(kafka_broker, tmp_path, tiny_model_dir, SHORT)

    assert result.failures() == [], result.to_dict()
    assert result.malformed_in_dlq == result.malformed_with_expected_reason == SHORT.malformed
    assert result.exit_code == 0 and result.consumed == SHORT.malformed + SHORT.valid
    assert result.valid_applied + result.valid_failed == SHORT.valid
