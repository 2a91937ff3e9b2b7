"""Audits on tiny random models: the fast teacher-forced path against the plain definition
(greedy decoding + ``answer_matches``), locality and perplexity before and after damage, the
age-stratified sample, the baseline cache, and the report JSON shape."""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from daemon.audit_schedule import SCHEDULE_TRIGGERS
from editing.checks import DECODE_SLACK_TOKENS, answer_matches
from editing.generation import greedy_generate
from editing.models import LoadedModel
from editing.perplexity import LINE_CHARS
from editing.requests import continuation
from editing.tiny import tiny_loaded
from monitoring.audit_report import (
    REPORT_SCHEMA,
    TRIGGERS,
    AuditReport,
    read_reports,
    write_report,
)
from monitoring.auditor import FAILING_IDS_CAP, AuditFact, Auditor
from monitoring.baseline import Baseline
from monitoring.errors import AuditError, AuditReportError, ProbeSetError
from monitoring.gates import GateDecision, GateThresholds
from monitoring.probes.load import (
    TEXT_BUDGET_CHARS,
    Probe,
    bundled_probe_path,
    load_probe_set,
    load_text_sample,
)
from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    PerplexityFigures,
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


def test_stratified_sample_covers_every_age_band_and_is_seeded() -> None:
    picks = stratified_sample(1000, 100, seed=0)
    assert len(picks) == len(set(picks)) == 100 and picks == sorted(picks)
    assert [sum(lo <= i < lo + 100 for i in picks) for lo in range(0, 1000, 100)] == [10] * 10
    assert stratified_sample(1000, 100, seed=0) == picks
    assert stratified_sample(1000, 100, seed=1) != picks
    uneven = stratified_sample(23, 7, seed=0)
    assert len(set(uneven)) == 7 and all(0 <= i < 23 for i in uneven)
    assert stratified_sample(5, 10, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        stratified_sample(5, 0, seed=0)


def test_wilson_interval_matches_published_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(91, 100) == pytest.approx((0.8377, 0.9519), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_figures_are_shares_of_outcomes_and_none_where_nothing_was_checked() -> None:
    retention = RetentionFigures.of([True, True, False, True], [1.0, 0.5, 0.0, 1.0])
    assert (retention.exact_match, retention.token_accuracy) == (0.75, 0.625)
    assert retention.ci95 == wilson_interval(3, 4)
    assert RetentionFigures.of([], []) == RetentionFigures(None, None, None)
    assert GeneralisationFigures.of([]) == GeneralisationFigures(None, 0)
    assert LocalityFigures.of([True, False], [True, True]) == LocalityFigures(0.5, 1.0, 2)
    with pytest.raises(ValueError, match="per probe"):
        LocalityFigures.of([True], [True, False])
    assert PerplexityFigures.of(10.0, 12.5) == PerplexityFigures(10.0, 12.5, 0.25)


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


# --- probe set and text sample -----------------------------------------------------------------


def test_bundled_probe_set_loads() -> None:
    probes = load_probe_set(None)
    assert 250 <= len(probes) <= 350
    assert len({p.prompt for p in probes}) == len(probes)
    assert all(p.prompt.strip() and p.answer.strip() for p in probes)
    assert load_probe_set(bundled_probe_path()) == probes


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ('["a", "b"]', "line 3: expected an object"),
        ('{"prompt": "Q"}', "line 3: expected an object with exactly"),
        ('{"prompt": "Q", "answer": "A", "x": 1}', "line 3: expected an object with exactly"),
        ('{"prompt": "Q", "answer": "  "}', "line 3: prompt and answer must be non-empty"),
        ('{"prompt": "P", "answer": "B"}', "line 3: prompt already given on line 1"),
    ],
)
def test_malformed_probe_files_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text('{"prompt": "P", "answer": "A"}\n\n' + line + "\n")
    with pytest.raises(ProbeSetError, match=re.escape(message)):
        load_probe_set(path)


def test_missing_or_empty_probe_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProbeSetError, match="does not exist"):
        load_probe_set(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ProbeSetError, match="holds no probes"):
        load_probe_set(tmp_path / "empty.jsonl")


def test_text_sample_defaults_to_probe_statements_and_skips_one_word_lines(
    tmp_path: Path,
) -> None:
    probes = [Probe("The capital of France is", "Paris")]
    assert load_text_sample(None, probes) == ["The capital of France is Paris"]
    path = tmp_path / "text.txt"
    path.write_text("\n  Hello   world  \nsingle\n" + ("x " * 400 + "\n") * 100)
    lines = load_text_sample(path, probes)
    assert lines[0] == "Hello world"
    assert all(len(line) <= LINE_CHARS for line in lines)
    assert TEXT_BUDGET_CHARS <= sum(map(len, lines)) < TEXT_BUDGET_CHARS + LINE_CHARS
    (tmp_path / "words.txt").write_text("one\ntwo\n")
    with pytest.raises(AuditError, match="no line of two or more words"):
        load_text_sample(tmp_path / "words.txt", probes)


# --- results and reports -----------------------------------------------------------------------

EXAMPLE_REPORT = """
{"schema": "factkeeper-audit/v1", "version": "3", "previous_good_version": "2",
 "started_at": "2026-11-23T15:00:00+00:00", "seconds": 12.3, "trigger": "edits",
 "edits_total": 250, "edits_audited": 250, "sampled": false,
 "retention": {"exact_match": 0.91, "token_accuracy": 0.95, "ci95": [0.87, 0.94]},
 "generalisation": {"exact_match": 0.4, "n": 120},
 "locality": {"agreement": 0.97, "gold_accuracy": 0.95, "n": 300},
 "perplexity": {"base": 12.1, "current": 12.4, "drift": 0.025},
 "gate": {"passed": true, "reasons": [], "thresholds": {"retention_floor": 0.8,
   "locality_floor": 0.9, "max_drop": 0.05, "max_perplexity_drift": 0.1}},
 "action": "promoted", "rolled_back_to": null, "quarantined_event_ids": [],
 "failing_event_ids": []}
"""


def _result(**changes: object) -> AuditReport:
    base = AuditReport(
        started_at="2026-11-23T15:00:00+00:00",
        seconds=12.3,
        edits_total=250,
        edits_audited=250,
        sampled=False,
        retention=RetentionFigures(0.91, 0.95, (0.87, 0.94)),
        generalisation=GeneralisationFigures(None, 0),
        locality=LocalityFigures(0.97, 0.95, 300),
        perplexity=PerplexityFigures(12.1, 12.4, 0.025),
        failing_event_ids=("e1", "e7"),
        failing_total=2,
        timings={"teacher_forced_seconds": 10.0},
    )
    return AuditReport(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def _report(result: AuditReport, version: str | None = "3") -> AuditReport:
    return result.judged(
        decision=GateDecision(False, ("retention fell",)),
        thresholds=GateThresholds(),
        trigger="timer",
        version=version,
        previous_good_version="2",
        action="rolled_back",
        rolled_back_to="2",
        quarantined_event_ids=["e7"],
    )


def _shape(value: object) -> object:
    """Keys and JSON types, recursively: what the renderer relies on."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


def test_report_json_has_exactly_the_agreed_shape() -> None:
    example = json.loads(EXAMPLE_REPORT)
    data = json.loads(_report(_result()).to_json())
    assert list(data) == list(example)
    for key in ("retention", "generalisation", "locality", "perplexity", "gate"):
        assert list(data[key]) == list(example[key])
    assert list(data["gate"]["thresholds"]) == list(example["gate"]["thresholds"])
    assert data["schema"] == REPORT_SCHEMA
    assert data["generalisation"] == {"exact_match": None, "n": 0}
    assert data["retention"]["ci95"] == [0.87, 0.94]
    assert (data["trigger"], data["action"], data["rolled_back_to"]) == (
        "timer",
        "rolled_back",
        "2",
    )
    assert data["quarantined_event_ids"] == ["e7"] and data["failing_event_ids"] == ["e1", "e7"]
    parsed = AuditReport.from_dict(example)
    assert _shape(parsed.to_dict()) == _shape(example)
    assert parsed.to_dict() == example


def test_every_schedule_trigger_can_be_reported() -> None:
    assert set(SCHEDULE_TRIGGERS) < set(TRIGGERS)


def test_report_round_trips_and_rejects_other_shapes() -> None:
    report = _report(_result(generalisation=GeneralisationFigures(0.4, 120)), version=None)
    back = AuditReport.from_json(report.to_json())
    assert back == report
    assert back.timings == {} and back.failing_total == len(report.failing_event_ids)
    with pytest.raises(AuditReportError, match="trigger, gate and thresholds"):
        replace(report, gate=None)
    data = json.loads(report.to_json())
    with pytest.raises(AuditReportError, match="unknown keys"):
        AuditReport.from_dict({**data, "extra": 1})
    with pytest.raises(AuditReportError, match="missing keys"):
        AuditReport.from_dict({k: v for k, v in data.items() if k != "action"})
    with pytest.raises(AuditReportError, match="locality"):
        AuditReport.from_dict({**data, "locality": {"agreement": 1.0}})
    with pytest.raises(AuditReportError, match="schema"):
        AuditReport.from_dict({**data, "schema": "factkeeper-audit/v0"})
    with pytest.raises(AuditReportError, match="trigger"):
        AuditReport.from_dict({**data, "trigger": "cron"})
    with pytest.raises(AuditReportError, match="not valid JSON"):
        AuditReport.from_json("{")


def test_reports_are_written_atomically_under_their_time_and_read_oldest_first(
    tmp_path: Path,
) -> None:
    late = _report(_result(started_at="2026-11-23T16:30:05+01:00"), version="4")
    early = _report(_result(started_at="2026-11-23T15:00:00+00:00"), version=None)
    first = write_report(tmp_path, late)
    second = write_report(tmp_path, early)
    again = write_report(tmp_path, early)
    assert first.name == "audit-20261123T153005-v4.json"
    assert second.name == "audit-20261123T150000-vnone.json"
    assert again.name == "audit-20261123T150000-vnone-1.json"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert read_reports(tmp_path) == [early, early, late]
    assert read_reports(tmp_path / "absent") == []
    (tmp_path / "audit-20990101T000000-v9.json").write_text("{}")
    with pytest.raises(AuditReportError, match="audit-20990101T000000-v9.json"):
        read_reports(tmp_path)


def test_an_unjudged_audit_flattens_for_mlflow_but_is_not_written() -> None:
    result = _result()
    assert result.gate is None and not result.gate_passed
    with pytest.raises(AuditReportError, match="judged"):
        result.to_dict()
    metrics = result.metrics()
    assert metrics["audit_retention_exact_match"] == 0.91
    assert metrics["audit_retention_ci95_low"] == 0.87
    assert metrics["audit_locality_agreement"] == 0.97
    assert metrics["audit_perplexity_drift"] == 0.025
    assert metrics["audit_teacher_forced_seconds"] == 10.0
    assert "audit_generalisation_exact_match" not in metrics  # None is left out
    assert all(isinstance(v, float) for v in metrics.values())
    report = _report(result)
    assert report.retention == result.retention and not report.gate_passed
    assert report.timings == result.timings and report.metrics() == metrics


def test_a_report_can_carry_the_whole_audit_step_time() -> None:
    started = datetime(2026, 11, 23, 16, 0, 5, 123456, tzinfo=timezone(timedelta(hours=1)))
    report = _result().judged(
        decision=GateDecision(True),
        thresholds=GateThresholds(),
        trigger="requested",
        version="5",
        previous_good_version="5",
        action="promoted",
        started_at=started,
        seconds=40.5,
    )
    assert (report.started_at, report.seconds) == ("2026-11-23T15:00:05+00:00", 40.5)
    assert report.gate_passed
