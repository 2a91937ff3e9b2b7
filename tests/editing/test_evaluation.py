"""The yardstick's metrics on hand-built cases whose answers are known."""

import math

import pytest
import torch

from editing.evaluation import (
    SUMMARY_KEYS,
    EvalConfig,
    Evaluator,
    ModelState,
    ngram_entropy,
    prefers,
)
from editing.requests import EditRequest, LocalityProbe
from editing.scoring import Scored, TeacherForcedScorer
from editing.tiny import tiny_loaded
from tests.editing.conftest import FACT

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["The quick brown fox jumps over the lazy dog", "A second line of ordinary text here"]


def _scored(answer, argmax, logprobs=None):
    return Scored(tuple(answer), tuple(argmax), tuple(logprobs or [-0.1] * len(answer)))


def test_a_model_that_predicts_the_target_scores_one(taught):
    scorer = TeacherForcedScorer(taught.model, taught.tokenizer, taught.adapter)
    [paris, rome] = scorer.score([(FACT.prompt, "Paris"), (FACT.prompt, "Rome")])
    assert paris.token_accuracy == 1.0 and paris.all_correct
    assert rome.token_accuracy == 0.0  # " Rome" shares no position-wise argmax with " Paris"
    assert prefers(paris, rome) and paris.prob > rome.prob


def test_summary_on_known_cases(taught):
    told = FACT
    wrong = EditRequest("wrong", FACT.prompt, "France", "Rome", target_true="Paris")
    unrelated = [LocalityProbe("Apple was founded by", "Steve Jobs", "unrelated")]
    config = EvalConfig(fluency_prompts=1, fluency_new_tokens=4)
    ev = Evaluator(taught, [told, wrong], config, unrelated=unrelated, text=TEXT)
    assert ev.unrelated_dropped == 1  # the same prompt is a probe of the stream: not unrelated
    base = ev.prepare_base(capture_layers=[2])
    assert set(base["summary"]) <= set(SUMMARY_KEYS)
    report = ev.evaluate([told], ModelState(is_base=False))  # recomputed, same weights
    s = report["summary"]
    assert s["efficacy_exact"] == 1.0 and s["paraphrase_exact"] == 1.0
    assert s["efficacy_token"] == 1.0 and s["paraphrase_token"] == 1.0
    assert s["es"] == 1.0 and s["ps"] == 1.0
    assert s["neighbourhood_kept"] == 1.0  # nothing changed
    assert s["perplexity_drift"] == pytest.approx(0.0, abs=1e-5)
    assert s["retention_first100"] == 1.0
    wrong_report = ev.evaluate([wrong], ModelState(is_base=False, resume_layer=2))
    assert wrong_report["summary"]["efficacy_exact"] == 0.0
    assert wrong_report["summary"]["es"] == 0.0
    assert wrong_report["summary"]["paraphrase_exact"] is None  # no paraphrases
    assert base["summary"]["efficacy_exact"] == 0.5 and base["n_requests"] == 2
    assert ev.retained([told, wrong], ModelState(is_base=False, resume_layer=2)) == [1.0, 0.0]
    assert ev.curve_locality(ModelState(is_base=False, resume_layer=2)) == 1.0
    assert ev.known_true_examples() == [{"prompt": wrong.prompt, "target_true": "Paris"}]
    assert ev.known_true_share() == 0.5


def test_a_new_answer_equal_to_the_true_one_has_no_probability_scores(taught):
    """P(new) > P(true) has no meaning when they are the same text; left out, not a coin flip."""
    same = EditRequest("same", FACT.prompt, "France", "Paris", target_true="Paris")
    ev = Evaluator(taught, [same, FACT], EvalConfig(fluency_prompts=0))
    ev.prepare_base()
    per = ev.evaluate([same, FACT], ModelState(is_base=False))["per_request"]
    assert per["es"] == [None, 1.0] and per["ps"][0] is None


def test_kept_and_perplexity_move_when_the_weights_change(taught):
    unrelated = [LocalityProbe("The weather today is", "sunny", "unrelated")]
    ev = Evaluator(taught, [FACT], EvalConfig(fluency_prompts=0), unrelated=unrelated, text=TEXT)
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
    s = report["summary"]
    assert s["neighbourhood_kept"] == 0.0 and s["unrelated_kept"] == 0.0
    assert s["efficacy_exact"] == 0.0
    assert s["perplexity_drift"] > 0.05


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


def test_prefers_the_lower_nll():
    assert prefers(_scored([1], [1], [-0.1]), _scored([2], [1], [-2.0]))
    assert not prefers(_scored([1], [1], [-2.0]), _scored([2], [1], [-0.1]))


def test_ngram_entropy_of_known_texts():
    # 5 distinct words: 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3 bits).
    assert ngram_entropy("a b c d e") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("the the the the the") == 0.0


def test_eval_config_is_checked():
    with pytest.raises(ValueError, match="batch_tokens"):
        EvalConfig(batch_tokens=0)


def test_pairs_sharing_a_prefix_score_as_they_would_alone(taught):
    """Packed rows (prefix trees: one prompt with several answers, prompts with a common
    opening) give each pair its separate-row result, on a full pass and on a pass resumed from
    residuals captured packed, and run each shared token once."""
    packed = TeacherForcedScorer(taught.model, taught.tokenizer, taught.adapter)
    alone = TeacherForcedScorer(taught.model, taught.tokenizer, taught.adapter)
    alone.packable = False
    assert packed.packable
    pairs = [
        (FACT.prompt, "Paris"),
        (FACT.prompt, "Rome"),
        (FACT.prompt, "the city of Lyon"),
        ("Apple was founded by", "Steve Jobs"),
        ("Apple was founded by", "Paris"),
        ("Apple was founded in", "Cupertino"),
        ("Apple", "was founded by Steve Jobs"),
    ]
    reference = alone.score(pairs)
    full = packed.score(pairs, capture_layers=[2])
    packed.tokens_run = 0
    resumed = packed.score(pairs, resume_layer=2)
    runs = [packed.encode(p).ids[:-1] for p in pairs]  # the answer's last token is never run
    prefixes = {run[:k] for run in runs for k in range(1, len(run) + 1)}
    assert packed.tokens_run == len(prefixes) < sum(map(len, runs))
    for ref, a, b in zip(reference, full, resumed, strict=True):
        assert ref.argmax_ids == a.argmax_ids == b.argmax_ids
        assert a.nll == pytest.approx(ref.nll, abs=1e-5) and b.nll == pytest.approx(
            ref.nll, abs=1e-5
        )


def test_scores_equal_a_plain_forward_pass_without_running_the_last_token(taught):
    """Log-probabilities and argmaxes are a plain causal pass's; the answer's last token, whose
    position predicts nothing read, is not run."""
    scorer = TeacherForcedScorer(taught.model, taught.tokenizer, taught.adapter)
    scorer.packable = False
    scorer.tokens_run = 0
    pairs = [(FACT.prompt, "the city of Lyon"), ("Apple was founded by", "Steve Jobs")]
    scored = scorer.score(pairs)
    for pair, s in zip(pairs, scored, strict=True):
        enc = scorer.encode(pair)
        with torch.no_grad():
            logits = taught.model(input_ids=torch.tensor([enc.ids])).logits[0]  # (T, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        positions = range(enc.n_prompt - 1, len(enc.ids) - 1)
        expected = [logprobs[t, enc.ids[t + 1]].item() for t in positions]
        assert s.logprobs == pytest.approx(expected, abs=1e-4)
        assert list(s.argmax_ids) == [int(logprobs[t].argmax()) for t in positions]
    assert scorer.tokens_run == sum(len(scorer.encode(p).ids) - 1 for p in pairs)


def test_registered_answer_tokens_are_scored_as_given(taught):
    scorer = TeacherForcedScorer(taught.model, taught.tokenizer, taught.adapter)
    ids = scorer.encode((FACT.prompt, "Paris")).ids
    n = scorer.encode((FACT.prompt, "Paris")).n_prompt
    scorer.register((FACT.prompt, "whatever text"), ids[n:])
    [a, b] = scorer.score([(FACT.prompt, "Paris"), (FACT.prompt, "whatever text")])
    assert a == b
