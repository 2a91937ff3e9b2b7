"""Fixtures for the editing tests."""

from pathlib import Path

import pytest
import torch

from editing.keystats import KeyStatistics
from editing.paths import Paths
from editing.requests import EditRequest, LocalityProbe
from editing.scoring import TeacherForcedScorer
from editing.tiny import tiny_loaded
from tests.fixtures.threads import torch_threads

FACT = EditRequest(
    "fact",
    "The capital of France is",
    "France",
    "Paris",
    target_true="Rome",
    rephrases=("The Eiffel Tower is located in",),
    locality=(LocalityProbe("Apple was founded by", "Steve Jobs"),),
)
"""A fact the ``taught`` model states, with one paraphrase and one neighbourhood probe."""


@pytest.fixture
def one_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a busy machine two
    spinning OpenMP threads make every small op many times slower."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def taught():
    """A tiny llama trained until it continues the FACT prompt (and rephrase) with " Paris"."""
    lm = tiny_loaded("llama")
    tok = lm.tokenizer
    torch.manual_seed(0)
    with torch_threads(1):
        # Tokenised as the scorer does (prompt, then the answer on its own), so what is taught is
        # exactly what the metrics read, whatever the tokenizer merges across the boundary.
        scorer = TeacherForcedScorer(lm.model, tok, lm.adapter)
        rows = [scorer.encode((prompt, "Paris")).ids for prompt in (FACT.prompt, FACT.rephrases[0])]
        width = max(map(len, rows))
        input_ids = torch.tensor([list(r) + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = input_ids.masked_fill(mask == 0, -100)
        teach(lm, input_ids, labels, steps=100, attention_mask=mask)
    return lm


def teach(
    lm,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    attention_mask=None,
    lr: float = 1e-2,
) -> None:
    """Train a tiny model on these rows with full-batch Adam until it continues them as
    labelled."""
    optimizer = torch.optim.Adam(lm.model.parameters(), lr=lr)
    lm.model.train()
    for _ in range(steps):
        loss = lm.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.model.eval()


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
