"""Fixtures for the editing tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a busy machine two
    spinning OpenMP threads make every small op many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
