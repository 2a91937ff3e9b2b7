"""Metrics on hand-built cases whose answers are known."""

import math

import pytest
import torch

from editing.generation import greedy_generate
from editing.metrics import (
    EvalConfig,
    Evaluator,
    ModelState,
    greedy_match_from_argmax,
    matches_answer,
    ngram_entropy,
    prefers,
    starts_with_target,
    unchanged_share,
)
from editing.requests import EditRequest, LocalityProbe, continuation
from editing.scoring import Scored, TeacherForcedScorer
from editing.tiny import tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")

FACT = EditRequest(
    "fact",
    "The capital of France is",
    "France",
    "Paris",
    target_true="Rome",
    rephrases=("The Eiffel Tower is located in",),
    locality=(LocalityProbe("Apple was founded by", "Steve Jobs"),),
)


@pytest.fixture(scope="module")
def taught():
    """A tiny llama trained until it continues the FACT prompt (and rephrase) with " Paris"."""
    lm = tiny_loaded("llama")
    tok = lm.tokenizer
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    texts = [FACT.prompt + continuation("Paris"), FACT.rephrases[0] + continuation("Paris")]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.Adam(lm.model.parameters(), lr=3e-2)
    lm.model.train()
    for _ in range(60):
        loss = lm.model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.model.eval()
    torch.set_num_threads(threads)
    return lm


def _scored(answer, argmax, logprobs=None):
    return Scored(tuple(answer), tuple(argmax), tuple(logprobs or [-0.1] * len(answer)))


def test_a_model_that_predicts_the_target_scores_one(taught):
    scorer = TeacherForcedScorer(taught.model, taught.tokenizer, taught.adapter)
    [paris, rome] = scorer.score([(FACT.prompt, "Paris"), (FACT.prompt, "Rome")])
    assert paris.token_accuracy == 1.0 and paris.all_correct
    assert rome.token_accuracy == 0.0  # " Rome" shares no position-wise argmax with " Paris"
    assert prefers(paris, rome) and paris.prob > rome.prob
    [text] = greedy_generate(taught.model, taught.tokenizer, [FACT.prompt], 4)
    assert starts_with_target(text, "Paris")


def test_evaluator_on_known_cases(taught):
    told = FACT
    wrong = EditRequest("wrong", FACT.prompt, "France", "Rome", target_true="Paris")
    ev = Evaluator(taught, [told, wrong], EvalConfig(fluency_prompts=1, fluency_new_tokens=4))
    base = ev.prepare_base(capture_layers=[2])
    report = ev.evaluate([told], ModelState(is_base=False))  # recomputed, same weights
    assert report["efficacy"] == 1.0 and report["generalization"] == 1.0
    assert report["gen_exact_match"] == 1.0 and report["efficacy_all_tokens"] == 1.0
    assert report["efficacy_score"] == 1.0 and report["efficacy_magnitude"] > 0
    assert report["locality"] == 1.0  # nothing changed
    wrong_report = ev.evaluate([wrong], ModelState(is_base=False, resume_layer=2))
    assert wrong_report["efficacy"] == 0.0 and wrong_report["gen_exact_match"] == 0.0
    assert wrong_report["gen_exact_match_true"] == 1.0  # it still says Paris
    assert wrong_report["efficacy_score"] == 0.0
    assert base["locality"] == 1.0 and base["n_requests"] == 2
    assert ev.curve_locality(ModelState(is_base=False, resume_layer=2)) == 1.0
    assert ev.known_true_examples() == [{"prompt": wrong.prompt, "target_true": "Paris"}]


def test_locality_drops_when_the_weights_change(taught):
    ev = Evaluator(taught, [FACT], EvalConfig(fluency_prompts=0))
    ev.prepare_base()
    params = dict(taught.model.named_parameters())
    key = "lm_head.weight" if "lm_head.weight" in params else "model.embed_tokens.weight"
    saved = params[key].detach().clone()
    with torch.no_grad():
        params[key].add_(torch.randn_like(saved, generator=torch.Generator().manual_seed(1)))
    try:
        report = ev.evaluate([FACT], ModelState.from_touched(taught.adapter, {key}))
    finally:
        with torch.no_grad():
            params[key].copy_(saved)
    assert report["locality"] < 1.0


def test_resumed_scoring_equals_a_full_pass(taught):
    scorer = TeacherForcedScorer(taught.model, taught.tokenizer, taught.adapter)
    assert scorer.resumable
    pairs = [(FACT.prompt, "Paris"), ("Apple was founded by", "Steve Jobs")]
    full = scorer.score(pairs)
    resumed = scorer.score(pairs, resume_layer=2)
    for a, b in zip(full, resumed, strict=True):
        assert a.argmax_ids == b.argmax_ids
        assert a.nll == pytest.approx(b.nll, abs=1e-5)


def test_gpt2_cannot_resume_so_it_runs_full_passes():
    lm = tiny_loaded("gpt2")
    scorer = TeacherForcedScorer(lm.model, lm.tokenizer, lm.adapter)
    assert not scorer.resumable
    pairs = [("The capital of France is", "Paris")]
    assert scorer.score(pairs, resume_layer=2) == scorer.score(pairs)


def test_model_state_from_touched_parameters():
    adapter = tiny_loaded("llama").adapter
    assert ModelState.from_touched(adapter, set()).is_base
    state = ModelState.from_touched(
        adapter, {"model.layers.3.mlp.down_proj.weight", "model.layers.2.mlp.up_proj.weight"}
    )
    assert (state.is_base, state.resume_layer) == (False, 2)
    assert ModelState.from_touched(adapter, {"model.norm.weight"}).resume_layer == 0


def test_unchanged_share_and_prefers():
    before = _scored([1, 2, 3], [1, 5, 3])
    assert unchanged_share(before, _scored([1, 2, 3], [1, 5, 3])) == 1.0
    assert unchanged_share(before, _scored([1, 2, 3], [1, 2, 4])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        unchanged_share(before, _scored([9], [9]))
    assert prefers(_scored([1], [1], [-0.1]), _scored([2], [1], [-2.0]))


def test_ngram_entropy_of_known_texts():
    # 5 distinct words: 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3 bits).
    assert ngram_entropy("a b c d e") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("the the the the the") == 0.0


def test_greedy_match_from_the_argmax_path():
    pieces = {1: " Par", 2: "is", 3: " Rome", 4: " Pa", 5: "\n", 6: " Parisian"}
    piece = pieces.__getitem__
    assert greedy_match_from_argmax(_scored([1, 2], [1, 2]), "Paris", piece) is True
    assert greedy_match_from_argmax(_scored([1, 2], [3, 2]), "Paris", piece) is False
    assert greedy_match_from_argmax(_scored([1, 2], [4, 2]), "Paris", piece) is None
    assert greedy_match_from_argmax(_scored([1, 2], [5, 2]), "Paris", piece) is None
    assert greedy_match_from_argmax(_scored([1, 2], [6, 2]), "Paris", piece) is True
    assert starts_with_target(" Paris is nice", "Paris")
    assert not starts_with_target(" Rome", "Paris")


def test_multihop_answers_match_whole_words():
    assert matches_answer(" Arabic, mostly.\nQ: next", ["Arabic"])
    assert matches_answer(" it is ar", ["Arabic", "ar"])
    assert not matches_answer(" Narendra", ["ar"])
    assert not matches_answer("\n", ["English"])


def test_eval_config_is_checked():
    with pytest.raises(ValueError, match="batch_tokens"):
        EvalConfig(batch_tokens=0)
