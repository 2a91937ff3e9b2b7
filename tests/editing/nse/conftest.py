"""A tiny llama trained for a few hundred steps so it knows a handful of facts, and the key
statistics of a small corpus, shared by the NSE tests (built once per module, a few seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from editing.keystats import KeyStatistics
from editing.models import LoadedModel
from editing.tiny import tiny_loaded
from tests.editing.conftest import small_key_statistics, teach
from tests.fixtures.threads import torch_threads

# Prompts end on the subject: a 4-layer model reads the subject at the last position, so the
# value written at the subject's last token decides the answer (in a large model, the MLPs of
# the middle layers put it there; here the test arranges it). Subjects and objects are single
# tokens of the tiny tokenizer.
FACTS = (
    ("The twin city of Paris", "Paris", "Rome"),
    ("The twin city of Rome", "Rome", "Japan"),
    ("The twin city of Japan", "Japan", "Paris"),
)
FILLER = ("The capital of France is Paris.", "Toko Yasuda plays the guitar.")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models are dominated by per-op overhead: on a shared 2-core machine, two intra-op
    threads make them 10-20x slower than one. The deterministic thread count also fixes the
    float summation order, which the determinism tests rely on."""
    with torch_threads(1):
        yield


def train_facts(lm: LoadedModel, steps: int = 300, lr: float = 1e-2) -> None:
    """Fit the model to the facts and the filler sentences (full-batch Adam, seeded)."""
    torch.manual_seed(0)
    texts = [f"{prompt} {answer}." for prompt, _, answer in FACTS] + list(FILLER)
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)  # (B, T)
    teach(lm, enc.input_ids, labels, steps, attention_mask=enc.attention_mask, lr=lr)
    for p in lm.model.parameters():
        p.requires_grad_(True)


@pytest.fixture(scope="module")
def trained_state() -> dict[str, torch.Tensor]:
    """Weights of the trained tiny llama (each test loads them into a fresh model)."""
    lm = tiny_loaded("llama")
    train_facts(lm)
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


@pytest.fixture
def trained_lm(trained_state: dict[str, torch.Tensor]) -> LoadedModel:
    lm = tiny_loaded("llama")
    lm.model.load_state_dict(trained_state)
    return lm


@pytest.fixture(scope="module")
def small_stats(tmp_path_factory: pytest.TempPathFactory) -> KeyStatistics:
    """C0 of the tiny model on a small corpus (per module; the cache key keeps models apart)."""
    text = "\n".join((list(FILLER) + [f"{p} {a}." for p, _, a in FACTS]) * 40)
    return small_key_statistics(tmp_path_factory.mktemp("stats"), text, max_tokens=2048)
