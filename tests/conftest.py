"""Shared fixtures: the real Kafka broker (tests/fixtures/kafka.py) and model locations."""

from pathlib import Path

import pytest

from editing.paths import Paths

pytest_plugins = ["tests.fixtures.kafka"]


@pytest.fixture(scope="session")
def smollm2_paths() -> Paths:
    """The user's factkeeper home, so the de-quantised SmolLM2 cache is built once per machine."""
    return Paths.from_env()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny editable llama saved as a local model folder, loaded like SmolLM2's cache."""
    from tests.daemon.harness import save_editable_tiny_model

    return save_editable_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
