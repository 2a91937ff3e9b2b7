"""Tiny models, hand-made requests and small EMSEdit configs shared by the EMSEdit tests."""

import pytest

from editing.emsedit.config import EMSEditConfig, ModuleGroup
from editing.requests import EditRequest, LocalityProbe

FACTS = [
    ("The capital of France is", "France", "Rome", "Which city is the capital of France?"),
    ("The capital of Italy is", "Italy", "Madrid", "Italy's capital is"),
    ("The official language of Japan is", "Japan", "French", "In Japan people speak"),
    ("Apple was founded by", "Apple", "Bill Gates", "The founder of Apple is"),
    ("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "The Eiffel Tower stands in"),
    ("Lionel Messi plays", "Lionel Messi", "guitar", "Messi is good at"),
]


def make_requests() -> list[EditRequest]:
    return [
        EditRequest(
            f"r{i}",
            prompt,
            subject,
            target,
            rephrases=(rephrase,),
            locality=(LocalityProbe("Who wrote Hamlet?", "William Shakespeare"),),
        )
        for i, (prompt, subject, target, rephrase) in enumerate(FACTS)
    ]


def tiny_config(**changes) -> EMSEditConfig:
    """Two shape groups (down x2 shares one net, up x1 another), rank 8, two steps."""
    base = EMSEditConfig(
        modules=(ModuleGroup("down", (1, 2)), ModuleGroup("up", (2,))),
        rank=8,
        n_blocks=2,
        lr_init=1.0e-2,
        meta_lr=1.0e-3,
        edits_per_batch=2,
        turns_per_sequence=2,
        lm_batch_size=2,
        hypernet_batch_size=3,
    )
    return base.replace(**changes)


@pytest.fixture
def requests_() -> list[EditRequest]:
    return make_requests()
