"""Fixtures of the reliability scenarios (the broker and the tiny model come from tests/)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One thread, as the child daemons have: the in-process reference must sum floats alike."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
