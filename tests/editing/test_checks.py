"""The one judge: its rule on edge cases, its forced-pass shortcut, and agreement with decoding."""

from pathlib import Path

import pytest
import torch

from editing.checks import (
    BaseAnswers,
    Judge,
    answer_matches,
    contains_answer,
    proven_tokens,
    target_decided,
    unchanged_decided,
    unchanged_from_forced,
    verdict_from_forced,
)
from editing.generation import greedy_generate
from editing.scoring import Scored
from editing.tiny import tiny_loaded
from tests.editing.conftest import FACT, teach
from tests.fixtures.threads import torch_threads

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


def test_a_forced_draft_proves_greedy_tokens_up_to_its_first_wrong_one():
    assert proven_tokens([5, 6, 7], [5, 6, 7]) == [5, 6, 7]
    assert proven_tokens([5, 6, 7], [5, 9, 7]) == [5, 9]  # greedy emits 9, then unknown
    assert proven_tokens([5, 6], [4, 6]) == [4]


@pytest.mark.parametrize(
    ("text", "complete", "expected"),
    [
        ("\n", False, None),  # a newline first: the target may still follow
        ("\nPar", False, None),
        ("\nParis", False, None),  # the word boundary is still to come
        ("\nParis.", False, True),
        ("\nParisian", False, False),
        ("\nLondon", False, False),
        ("\nThe", False, False),
        ("\nParis", True, True),  # decoding stops here
        ("\nPa", True, False),
        ("Pari\ufffd", False, None),  # a token that splits a character
    ],
)
def test_a_partial_greedy_answer_decides_when_it_can(text, complete, expected):
    assert target_decided(text, "Paris", complete) is expected
    if complete:
        assert expected == answer_matches(text, "Paris")


def test_a_partial_answer_waits_for_what_may_compose_with_its_last_letter():
    assert target_decided("\nJose", "Jos\u00e9", False) is None  # a combining accent may follow
    assert target_decided("\nJose\u0301", "Jos\u00e9", True) is True
    assert target_decided("\n\uac00", "\uac01", False) is None  # Hangul composes by formula
    assert target_decided(" a <", " a \u226e b", False) is None  # "<" + U+0338 is "≮"


def test_a_partial_answer_settles_once_its_last_character_cannot_become_the_next():
    assert target_decided(" 1", "Motown", False) is False  # no mark turns a digit into "M"
    assert target_decided("\nA", "Doris", False) is False  # whatever follows "A", not "D"
    assert target_decided("\nA", "\u00c1d\u00e1m", False) is None  # "A" + U+0301 is "Á"
    assert target_decided("\n(", "Paris", False) is False
    assert unchanged_decided(" a 1", " a well-known", False) is False
    assert unchanged_decided(" a 1", " a 19th", False) is None


def test_a_partial_answer_is_unchanged_only_when_complete():
    assert unchanged_decided(" Par", " Paris", False) is None
    assert unchanged_decided(" Lon", " Paris", False) is False
    assert unchanged_decided("\n", " Paris", False) is False  # a newline is never rewritten
    assert unchanged_decided(" Paris ", " Paris, he said", False) is None  # cleanup: " ," -> ","
    assert unchanged_decided(" Paris", " Paris", False) is None
    assert unchanged_decided(" Paris", " Paris", True) is True
    assert unchanged_decided(" Pari", " Paris", True) is False


@pytest.fixture(scope="module")
def newline_first():
    """A tiny llama taught to answer FACT's prompt with a newline, then "Paris", then the end."""
    lm = tiny_loaded("llama", seed=1)
    tok = lm.tokenizer
    torch.manual_seed(0)
    ids = tok(FACT.prompt).input_ids + tok("\nParis", add_special_tokens=False).input_ids
    input_ids = torch.tensor([[*ids, tok.eos_token_id]])
    with torch_threads(1):
        teach(lm, input_ids, input_ids, steps=60)
    return lm


@pytest.mark.usefixtures("one_thread")
def test_an_answer_after_a_newline_is_judged_by_drafts_not_decoding(newline_first):
    """The forced pass of " Paris" sees a newline first; one draft proves the rest."""
    judge = Judge(newline_first)
    [text] = greedy_generate(newline_first.model, newline_first.tokenizer, [FACT.prompt], 8)
    assert text == "\nParis"  # the fixture taught it
    verdicts = judge.judge([(FACT.prompt, "Paris"), (FACT.prompt, "Pa"), (FACT.prompt, "Rome")])
    assert [v.ok for v in verdicts] == [True, False, False]
    assert verdicts[0].answer == "\nParis"
    assert judge.decoded == 0 and judge.drafted >= 1


@pytest.mark.usefixtures("one_thread")
def test_unchanged_answers_are_proven_by_drafts_when_not_forceable(newline_first):
    """A base answer known only as text (not forceable) is continued by drafts, not decoded."""
    judge = Judge(newline_first)
    base = BaseAnswers(
        (FACT.prompt, FACT.prompt), ("\nParis", "\nRome"), (4, 4), (False, False), ((), ())
    )
    kept, texts = judge.unchanged(base)
    assert kept == [True, False]
    assert judge.decoded == 0 and texts[0] == "\nParis"


@pytest.mark.usefixtures("one_thread")
def test_judge_and_unchanged_agree_with_decoding_on_a_random_model():
    """Targets cut from the greedy text at odd places make the forced pass undecided, so the
    drafts run; every verdict still equals the rule on decoded text."""
    lm = tiny_loaded("llama", seed=3)
    judge = Judge(lm)
    prompts = ["The capital of France is", "Apple was founded by", "The river", "Ode to a"]
    texts = greedy_generate(lm.model, lm.tokenizer, prompts, 6)
    checks = []
    for prompt, text in zip(prompts, texts, strict=True):
        word = text.strip()
        checks += [(prompt, word[:n]) for n in (1, 2, 3, 5, len(word)) if word[:n].strip()]
        checks.append((prompt, word[1:4] or "x"))
    budgets = {c: judge.answer_length(c) + 2 for c in checks}
    decoded = {c: greedy_generate(lm.model, lm.tokenizer, [c[0]], budgets[c])[0] for c in checks}
    verdicts = judge.judge(checks)
    assert [v.ok for v in verdicts] == [answer_matches(decoded[c], c[1]) for c in checks]
    assert any(v.ok for v in verdicts) and judge.drafted > 0

    base = BaseAnswers(
        tuple(prompts), tuple(texts), (6,) * 4, (False,) * 4, ((),) * 4
    )  # known as text only: every prompt is proven by drafts
    kept, _ = judge.unchanged(base)
    assert kept == [True] * 4


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
