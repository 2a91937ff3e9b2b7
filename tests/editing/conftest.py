"""Fixtures for the editing tests."""

from pathlib import Path

import pytest
import torch

from editing.keystats import KeyStatistics
from editing.paths import Paths


@pytest.fixture
def one_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a busy machine two
    spinning OpenMP threads make every small op many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_key_statistics(folder: Path, text: str, max_tokens: int = 1024) -> KeyStatistics:
    """Key statistics of a tiny model on ``text`` repeated: a corpus small enough for a test."""
    corpus = folder / "corpus.txt"
    folder.mkdir(parents=True, exist_ok=True)
    corpus.write_text(text)
    return KeyStatistics(
        Paths(folder / "home"),
        corpus=corpus,
        max_tokens=max_tokens,
        seq_len=16,
        batch_size=4,
        progress=False,
    )
