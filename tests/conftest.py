"""Shared fixtures: the real Kafka broker (tests/fixtures/kafka.py) and model locations."""

import pytest

from editing.paths import Paths

pytest_plugins = ["tests.fixtures.kafka"]


@pytest.fixture(scope="session")
def smollm2_paths() -> Paths:
    """The user's factkeeper home, so the de-quantised SmolLM2 cache is built once per machine."""
    return Paths.from_env()
