"""The one judge: its rule on edge cases, its forced-pass shortcut, and agreement with decoding."""

from pathlib import Path

import pytest

from editing.checks import (
    Judge,
    answer_matches,
    contains_answer,
    unchanged_from_forced,
    verdict_from_forced,
)
from editing.generation import greedy_generate
from editing.scoring import Scored
from tests.editing.conftest import FACT

REPO = Path(__file__).resolve().parents[2]


def _scored(answer, argmax):
    return Scored(tuple(answer), tuple(argmax), tuple([-0.1] * len(answer)))


@pytest.mark.parametrize(
    ("answer", "target", "expected"),
    [
        (" Paris", "Paris", True),
        ("Paris", " Paris ", True),  # surrounding whitespace of either side is ignored
        ("\n Paris is lovely", "Paris", True),
        (" paris", "Paris", False),  # case is part of the fact
        (" Romeo", "Rome", False),  # whole word
        (" Rome.", "Rome", True),
        (" Rome's", "Rome", True),
        (" Rome_x", "Rome", False),
        (" Paris-based", "Paris", True),
        (" U.S.A.", "U.S.", True),  # a target ending in punctuation needs no boundary
        (" New York City", "New York", True),
        (" New Yorker", "New York", False),
        (" 1990s", "1990", False),
        ("", "Paris", False),
        (" Paris", "", False),
        (" 東京都", "東京", True),  # Han: written without spaces, anything may follow
        (" ภาษาไทยดี", "ภาษาไทย", True),  # Thai, likewise
        (" Москвы", "Москва", False),
        (" Москва,", "Москва", True),
        (" Парижем", "Париж", False),  # Cyrillic letters continue the word
        (" भारती", "भारत", False),  # a Devanagari vowel sign (a combining mark) continues it
        (" भारत।", "भारत", True),
        (" Zu\u0308rich", "Z\u00fcrich", True),  # NFC: decomposed equals composed
        (" Zürich\u0301", "Zürich", False),  # a combining mark after the target continues it
    ],
)
def test_answer_matches_rule(answer, target, expected):
    assert answer_matches(answer, target) is expected


def test_verdict_from_the_forced_pass():
    pieces = {1: " Par", 2: "is", 3: " Rome", 4: " Pa", 5: "\n", 6: " Parisian", 7: ".", 8: "ian"}
    piece = pieces.__getitem__
    # every target token is the argmax: the token after it decides the word boundary
    assert verdict_from_forced(_scored([1, 2], [1, 2]), "Paris", piece, following=7) is True
    assert verdict_from_forced(_scored([1, 2], [1, 2]), "Paris", piece, following=8) is False
    assert verdict_from_forced(_scored([1, 2], [1, 2]), "Paris", piece, following=0, end_token=0)
    assert verdict_from_forced(_scored([1, 2], [1, 2]), "Paris", piece) is None  # unknown
    # a miss: the argmax text leaves the target, or may still spell it another way
    assert verdict_from_forced(_scored([1, 2], [3, 2]), "Paris", piece) is False
    assert verdict_from_forced(_scored([1, 2], [4, 2]), "Paris", piece) is None
    assert verdict_from_forced(_scored([1, 2], [5, 2]), "Paris", piece) is None
    assert verdict_from_forced(_scored([1, 2], [6, 2]), "Paris", piece) is False  # "Parisian"
    assert verdict_from_forced(_scored([1, 2], [1, 7]), "Paris", piece) is False  # " Par."
    # punctuation at the end of the target needs nothing after it
    dots = {1: " U", 2: ".S", 3: "."}
    assert verdict_from_forced(_scored([1, 2, 3], [1, 2, 3]), "U.S.", dots.__getitem__) is True


def test_unchanged_from_the_forced_pass():
    pieces = {1: " Steve", 2: " Jobs", 3: " Wozniak", 4: " Jo", 5: "bs"}
    piece = pieces.__getitem__
    assert unchanged_from_forced(_scored([1, 2], [1, 2]), " Steve Jobs", piece) is True
    assert unchanged_from_forced(_scored([1, 2], [1, 3]), " Steve Jobs", piece) is False
    assert unchanged_from_forced(_scored([1, 2], [1, 4]), " Steve Jobs", piece) is None


def test_multihop_answers_are_contained_as_whole_words():
    assert contains_answer(" Arabic, mostly.\nQ: next", ["Arabic"])
    assert contains_answer(" it is ar", ["Arabic", "ar"])
    assert not contains_answer(" Narendra", ["ar"])
    assert not contains_answer("\n", ["English"])


@pytest.mark.usefixtures("one_thread")
def test_judge_agrees_with_decoding(taught):
    """The shortcut never changes a verdict: the judge equals the rule on decoded text."""
    judge = Judge(taught)
    checks = [
        (FACT.prompt, "Paris"),
        (FACT.prompt, "Rome"),
        (FACT.prompt, "Par"),
        (FACT.rephrases[0], "Paris"),
        ("Apple was founded by", "Steve Jobs"),
        ("Apple was founded by", "Paris"),
    ]
    verdicts = judge.judge(checks)
    texts = greedy_generate(taught.model, taught.tokenizer, [p for p, _ in checks], 8)
    assert [v.ok for v in verdicts] == [
        answer_matches(t, target) for t, (_, target) in zip(texts, checks, strict=True)
    ]
    assert verdicts[0].ok and not verdicts[1].ok
    assert judge.decoded < len(checks)  # most verdicts came from the forced pass


@pytest.mark.usefixtures("one_thread")
def test_base_answers_are_kept_on_the_same_weights(taught):
    judge = Judge(taught)
    prompts = [FACT.prompt, "Apple was founded by", "The weather today is"]
    base = judge.base_answers(prompts, [3, 3, 3])
    kept, _ = judge.unchanged(base)
    assert kept == [True, True, True]


def test_one_definition_of_the_judge():
    """No other module decides "the model now says it" on its own."""
    names = ("def answer_matches", "def starts_with_target", "def greedy_match_from_argmax")
    found = [
        str(path.relative_to(REPO))
        for folder in ("editing", "daemon", "monitoring", "bench")
        for path in (REPO / folder).rglob("*.py")
        if any(name in path.read_text(encoding="utf-8") for name in names)
    ]
    assert found == ["editing/checks.py"]
