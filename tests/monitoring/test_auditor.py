"""The auditor on tiny random models: the fast teacher-forced path against the plain definition
(greedy decoding + ``answer_matches``), locality and perplexity before and after damage, the
age-stratified sample on a real audit, and the baseline cache."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from editing.checks import DECODE_SLACK_TOKENS, answer_matches
from editing.generation import greedy_generate
from editing.models import LoadedModel
from editing.requests import continuation
from editing.tiny import tiny_loaded
from monitoring.auditor import FAILING_IDS_CAP, AuditFact, Auditor
from monitoring.baseline import Baseline
from monitoring.errors import AuditError
from monitoring.probes.load import (
    Probe,
    load_text_sample,
)
from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    RetentionFigures,
    stratified_sample,
    wilson_interval,
)

pytestmark = pytest.mark.timeout(120)

_VOCABULARY = (
    "The capital of France Italy Spain is Paris Rome Madrid mother tongue Danielle Darrieux "
    "French official language Japan Japanese Apple founded by Steve Jobs Microsoft Bill Gates "
    "CEO Tesla Elon Musk Berlin Germany Hamlet William Shakespeare Toko Yasuda plays guitar "
    "Eiffel Tower located Colosseum Lionel Messi soccer"
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng, words = random.Random(seed), _VOCABULARY.split()
    return [" ".join(rng.sample(words, rng.randint(3, 7))) for _ in range(n)]


def _greedy(lm: LoadedModel, prompts: list[str], n: int) -> list[str]:
    return greedy_generate(lm.model, lm.tokenizer, prompts, n, batch_size=len(prompts) or 1)


def _holds(lm: LoadedModel, facts: list[AuditFact]) -> list[bool]:
    """The definition the audit must reproduce: greedy for target tokens + 2, answer_matches."""
    out = []
    for f in facts:
        n = len(lm.tokenizer(continuation(f.target), add_special_tokens=False).input_ids)
        out.append(answer_matches(_greedy(lm, [f.prompt], n + DECODE_SLACK_TOKENS)[0], f.target))
    return out


def _candidate_targets(text: str) -> list[str]:
    """Targets that the greedy text does and does not start with, at and off word boundaries."""
    stripped = text.strip()
    out = [stripped.split()[0]] if stripped.split() else []
    out += [stripped, stripped[:1], stripped[:2], stripped[:3], "Zebra"]
    return [t for t in dict.fromkeys(out) if t.strip()]


def _held_facts(lm: LoadedModel, n: int) -> list[AuditFact]:
    """Facts the unchanged tiny model holds: its greedy answer passes for the target."""
    return list(_held_by_model(lm.name, lm.base_hash)[:n])


@functools.cache
def _held_by_model(name: str, base_hash: str) -> tuple[AuditFact, ...]:
    family, seed = name.removeprefix("tiny-"), int(base_hash.rsplit("seed", 1)[1])
    lm = tiny_loaded(family, seed)
    prompts = _prompts(100, seed=1)
    firsts = [
        AuditFact(f"held-{i}", prompt, _candidate_targets(text)[0])
        for i, (prompt, text) in enumerate(zip(prompts, _greedy(lm, prompts, 6), strict=True))
    ]
    facts = [f for f, ok in zip(firsts, _holds(lm, firsts), strict=True) if ok]
    facts = list({f.prompt: f for f in facts}.values())
    assert len(facts) >= 12, f"only {len(facts)} held facts found"
    return tuple(facts)


def _probes(lm: LoadedModel, n: int = 12) -> list[Probe]:
    return [Probe(f.prompt, f.target) for f in _held_facts(lm, n)]


def _auditor(lm: LoadedModel, probes: list[Probe], **kwargs: object) -> Auditor:
    text = load_text_sample(None, probes)
    baseline = Baseline.compute(lm, probes, text)
    return Auditor(lm, probes, baseline, sample_cap=1000, **kwargs)  # type: ignore[arg-type]


def _damage_(lm: LoadedModel, from_layer: int, scale: float = 0.5) -> None:
    """Add seeded noise to every block from ``from_layer`` up."""
    generator = torch.Generator().manual_seed(0)
    blocks = lm.adapter.layers(lm.model)
    with torch.no_grad():
        for block in list(blocks)[from_layer:]:
            for p in block.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * scale)


# --- retention and generalisation --------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fast_path_gives_the_greedy_answer_matches_verdict_of_every_fact(family: str) -> None:
    lm = tiny_loaded(family)
    prompts = _prompts(16)
    facts = []
    for prompt, text in zip(prompts, _greedy(lm, prompts, 6), strict=True):
        for target in _candidate_targets(text):
            facts.append(AuditFact(f"f{len(facts)}", prompt, target))
    assert len(facts) < FAILING_IDS_CAP  # so failing_event_ids lists every failure
    expected = {f.event_id for f, ok in zip(facts, _holds(lm, facts), strict=True) if not ok}
    assert 0 < len(expected) < len(facts)  # both verdicts occur

    probes = [Probe(p, "Paris") for p in _prompts(3, seed=2)]  # locality is not under test
    result = _auditor(lm, probes).run(facts)

    assert set(result.failing_event_ids) == expected
    assert result.failing_total == len(expected)
    assert result.retention.exact_match == pytest.approx(1 - len(expected) / len(facts))


def test_facts_the_model_holds_give_retention_one_and_wrong_targets_zero() -> None:
    lm = tiny_loaded("llama")
    held = _held_facts(lm, 8)
    auditor = _auditor(lm, _probes(lm, 4))

    good = auditor.run(held)
    assert good.retention.exact_match == 1.0
    assert good.retention.token_accuracy == 1.0
    assert good.failing_event_ids == ()
    assert good.retention.ci95 == pytest.approx(wilson_interval(8, 8))
    assert good.generalisation == GeneralisationFigures(exact_match=None, n=0)

    wrong = [AuditFact(f.event_id, f.prompt, "Zebra Crossing") for f in held]
    bad = auditor.run(wrong)
    assert bad.retention.exact_match == 0.0
    assert bad.retention.token_accuracy is not None and bad.retention.token_accuracy < 1.0
    assert bad.failing_event_ids == tuple(f.event_id for f in held)


def test_rephrases_are_judged_like_prompts() -> None:
    lm = tiny_loaded("llama")
    a, b, c = _held_facts(lm, 3)
    # a's rephrase is b's prompt: it holds exactly when b's target is a's target.
    facts = [
        AuditFact("a", a.prompt, a.target, rephrases=(b.prompt, c.prompt)),
        AuditFact("b", b.prompt, b.target),
    ]
    expected = _holds(lm, [AuditFact("x", b.prompt, a.target), AuditFact("y", c.prompt, a.target)])
    result = _auditor(lm, _probes(lm, 4), rephrases_per_fact=None).run(facts)
    assert result.generalisation.n == 2
    assert result.generalisation.exact_match == pytest.approx(sum(expected) / 2)
    assert result.retention.exact_match == 1.0
    first_only = _auditor(lm, _probes(lm, 4)).run(facts)  # the default: one rephrase per fact
    assert first_only.generalisation == GeneralisationFigures(float(expected[0]), 1)


def test_an_empty_fact_list_has_no_retention_figures() -> None:
    lm = tiny_loaded("llama")
    result = _auditor(lm, _probes(lm, 4)).run([])
    assert result.retention == RetentionFigures(None, None, None)
    assert result.edits_total == result.edits_audited == 0
    assert not result.sampled
    assert result.locality.agreement == 1.0


# --- sampling ----------------------------------------------------------------------------------


def test_beyond_the_cap_a_stratified_sample_is_audited_with_an_interval() -> None:
    lm = tiny_loaded("llama")
    held = _held_facts(lm, 6)
    facts = [
        AuditFact(f"e{i}", held[i % 6].prompt, held[i % 6].target if i % 3 else "Zebra")
        for i in range(60)
    ]
    probes = _probes(lm, 4)
    text = load_text_sample(None, probes)
    baseline = Baseline.compute(lm, probes, text)
    auditor = Auditor(lm, probes, baseline, sample_cap=20, seed=3)

    result = auditor.run(facts)

    assert (result.edits_total, result.edits_audited, result.sampled) == (60, 20, True)
    chosen = stratified_sample(60, 20, seed=3)
    expected_failing = [f"e{i}" for i in chosen if i % 3 == 0]
    assert list(result.failing_event_ids) == expected_failing
    held_share = 1 - len(expected_failing) / 20
    assert result.retention.exact_match == pytest.approx(held_share)
    low, high = result.retention.ci95 or (2.0, -1.0)
    assert low < held_share < high
    assert (low, high) == pytest.approx(wilson_interval(20 - len(expected_failing), 20))


# --- locality and perplexity -------------------------------------------------------------------


def test_locality_is_one_on_unchanged_weights_and_drops_after_damage() -> None:
    lm = tiny_loaded("llama")
    probes = _probes(lm, 12)
    auditor = _auditor(lm, probes)
    before = auditor.run([])
    assert before.locality == LocalityFigures(agreement=1.0, gold_accuracy=1.0, n=12)
    assert before.perplexity.drift == pytest.approx(0.0, abs=1e-6)
    assert before.timings["prompts_decoded"] == sum(not f for f in auditor.baseline.forceable)

    _damage_(lm, from_layer=0, scale=1.0)
    after = auditor.run([])
    assert after.locality.agreement < 1.0
    assert after.locality.gold_accuracy < 1.0
    assert after.perplexity.current != pytest.approx(before.perplexity.current)
    assert after.perplexity.drift == pytest.approx(
        after.perplexity.current / after.perplexity.base - 1
    )


def test_resuming_above_unchanged_blocks_gives_the_same_audit() -> None:
    lm = tiny_loaded("llama")
    probes = _probes(lm, 8)
    facts = _held_facts(lm, 6) + [AuditFact("wrong", probes[0].prompt, "Zebra")]
    text = load_text_sample(None, probes)
    baseline = Baseline.compute(lm, probes, text)
    _damage_(lm, from_layer=2, scale=0.3)
    full = Auditor(lm, probes, baseline, sample_cap=100).run(facts)
    resumed_auditor = Auditor(lm, probes, baseline, sample_cap=100)
    for _ in range(2):  # the second run reads the cached residuals
        resumed = resumed_auditor.run(facts, resume_layer=2)
        assert resumed.retention == full.retention
        assert resumed.locality == full.locality
        assert resumed.failing_event_ids == full.failing_event_ids
        assert resumed.perplexity.current == pytest.approx(full.perplexity.current, rel=1e-5)


# --- baseline ----------------------------------------------------------------------------------


def test_baseline_is_cached_as_json_and_recomputed_when_its_key_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_loaded("llama")
    probes = _probes(lm, 6)
    text = load_text_sample(None, probes)
    first = Baseline.load_or_compute(lm, probes, text, tmp_path)
    files = list(tmp_path.glob("baseline-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["schema"] == "factkeeper-audit-baseline/v2"

    calls = []
    real_compute = Baseline.compute.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Baseline], *args: object, **kwargs: object) -> Baseline:
        calls.append(1)
        return real_compute(cls, *args, **kwargs)

    monkeypatch.setattr(Baseline, "compute", classmethod(counting))
    assert Baseline.load_or_compute(lm, probes, text, tmp_path) == first
    assert calls == []

    fewer = probes[:-1]
    other = Baseline.load_or_compute(lm, fewer, load_text_sample(None, fewer), tmp_path)
    assert calls == [1] and len(other.answers) == len(fewer)
    assert len(list(tmp_path.glob("baseline-*.json"))) == 2

    files[0].write_text('{"schema": "factkeeper-audit-baseline/v2", "answers": [')
    assert Baseline.load_or_compute(lm, probes, text, tmp_path) == first
    assert calls == [1, 1]
    # A file that parses but names other weights is not trusted either.
    stale = json.loads(files[0].read_text())
    files[0].write_text(json.dumps({**stale, "base_hash": "other-weights"}))
    assert Baseline.load_or_compute(lm, probes, text, tmp_path).base_hash == lm.base_hash
    assert calls == [1, 1, 1]


def test_auditor_refuses_a_baseline_of_other_probes_text_or_weights() -> None:
    lm = tiny_loaded("llama")
    probes = _probes(lm, 5)
    text = load_text_sample(None, probes)
    baseline = Baseline.compute(lm, probes, text)
    with pytest.raises(AuditError, match="another probe set"):
        Auditor(lm, probes[:-1], baseline, sample_cap=10, text=text)
    with pytest.raises(AuditError, match="another text sample"):
        Auditor(lm, probes, baseline, sample_cap=10, text=["some other text"])
    other = tiny_loaded("llama", seed=1)
    with pytest.raises(AuditError, match="other base weights"):
        Auditor(other, probes, baseline, sample_cap=10)
