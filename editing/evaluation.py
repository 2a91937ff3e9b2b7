"""Evaluating edits: the yardstick every editor is judged by.

One ``Evaluator`` per request stream and model. It runs the pre-edit (base) model once over every
prompt the metrics need and keeps those results: the base greedy answers define what "kept"
means, and while the weights are still the base weights (the ``none`` method) every metric is
read from that pass. After edits it scores the same pairs again, resuming from the lowest edited
block, and decodes only what the teacher-forced pass cannot decide (``editing.checks``).

The ``summary`` of a report holds the yardstick, under these keys (fractions in [0, 1]):

* ``efficacy_exact``: greedy decoding of the edit prompt begins with the new target, decided by
  the one judge (``editing.checks.answer_matches``). The headline figure.
* ``paraphrase_exact``: the same on real paraphrases (never generation prompts); None when the
  stream has none.
* ``neighbourhood_kept``: share of neighbourhood prompts (other subjects sharing the edited
  relation and true object) whose greedy answer is still the unedited model's.
* ``unrelated_kept``: the same on unrelated prompts: the probe set given to the evaluator (the
  bundled one in the benchmark) plus the stream's ``unrelated`` probes (ZsRE's NQ questions).
* ``perplexity_drift``: ``ppl / ppl_base - 1`` on a fixed WikiText test sample.
* ``es``, ``ps``, ``ns``: the papers' CounterFact scores: P(new) > P(true) on the edit prompt and
  on its paraphrases, P(true) > P(new) on its neighbourhood prompts (P: per-token geometric mean
  probability under teacher forcing; per-request means, then averaged). A request whose new
  answer is its true one (34 of ZsRE's first 1,000) has no comparison and is left out: two
  scorings of the same text would otherwise decide it by rounding.
* ``efficacy_token``, ``paraphrase_token``: teacher-forced token accuracy of the new target, for
  comparison with the ZsRE ``*_acc`` numbers of MEND/ROME/MEMIT only.
* ``retention_first100``: ``efficacy_exact`` of the first 100 edits after the last one.
* ``refused``, ``edit_seconds_p50``, ``edit_seconds_p95``, ``n_edits``, ``batch``: added by the
  benchmark.

Beside the summary: ``same_subject_kept`` (ZsRE's KnowEdit probes), ``generation_prompt_exact``
(CounterFact's MEND "rephrase", mostly a generation prompt), the unrelated figure per source,
fluency (ROME's n-gram entropy of greedy generations) and, for MQuAKE, multi-hop accuracy (a
question counts when the greedy answer contains the new answer or an alias as whole words; a
case counts when any of its questions does).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from editing.adapters import ArchitectureAdapter
from editing.checks import (
    DECODE_SLACK_TOKENS,
    BaseAnswers,
    Judge,
    Verdict,
    contains_answer,
    forced_map,
)
from editing.models import LoadedModel
from editing.perplexity import perplexity, text_pairs
from editing.requests import EditRequest, LocalityProbe
from editing.scoring import Pair, Scored, TeacherForcedScorer

log = logging.getLogger(__name__)

SUMMARY_KEYS: tuple[str, ...] = (
    "efficacy_exact",
    "paraphrase_exact",
    "neighbourhood_kept",
    "unrelated_kept",
    "perplexity_drift",
    "es",
    "ps",
    "ns",
    "efficacy_token",
    "paraphrase_token",
    "retention_first100",
    "refused",
    "edit_seconds_p50",
    "edit_seconds_p95",
    "n_edits",
    "batch",
)
"""The yardstick's keys, in the order tables show them (see the module docstring)."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings; none of them changes what a metric means."""

    batch_tokens: int = 2048
    """Padded tokens per teacher-forced batch."""
    gen_batch_size: int = 32
    fluency_prompts: int = 16
    """Generations in the fluency sample (the first requests' generation or edit prompts)."""
    fluency_new_tokens: int = 48
    multihop_template: str = "Q: {question}\nA:"
    multihop_new_tokens: int = 16
    curve_locality_requests: int = 100
    """The per-turn locality curve uses the neighbourhood probes of this many first requests."""
    first_n: int = 100
    """``retention_first100``: exact efficacy of the first this-many edits after the last."""
    perplexity_chars: int = 8000
    """Characters of the WikiText test sample the perplexity drift is measured on."""

    def __post_init__(self) -> None:
        for name in (
            "batch_tokens",
            "gen_batch_size",
            "fluency_new_tokens",
            "first_n",
            "perplexity_chars",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1")
        if self.fluency_prompts < 0:
            raise ValueError("EvalConfig.fluency_prompts must be >= 0")


@dataclass(frozen=True)
class ModelState:
    """How the current weights relate to the base weights, as far as evaluation cares."""

    is_base: bool
    """No parameter differs from the base model: every result can come from the base pass."""
    resume_layer: int = 0
    """Blocks below this index hold base weights (0: anything may differ)."""

    @classmethod
    def from_touched(cls, adapter: ArchitectureAdapter, touched: set[str]) -> ModelState:
        """The state after edits that changed the parameters named in ``touched``."""
        if not touched:
            return cls(is_base=True)
        prefix = adapter.layers_path + "."
        layers = []
        for name in touched:
            index = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else ""
            layers.append(int(index) if index.isdigit() else 0)  # outside the blocks: run all
        return cls(is_base=False, resume_layer=min(layers))


BASE = ModelState(is_base=True)


# --- metric functions ---------------------------------------------------------------------------


def mean(values: Iterable[float | None]) -> float | None:
    """Arithmetic mean of the values that are not None, or None when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def prefers(winner: Scored, loser: Scored) -> bool:
    """CounterFact's test: the first answer has the lower mean per-token NLL."""
    return winner.nll < loser.nll


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)):
    """ROME's fluency measure: weighted mean of the n-gram frequency entropies (bits)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    entropies = []
    for n, weight in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        entropies.append(weight * h)
    return sum(entropies) / len(entropies)


def summarise(per: dict[str, list[float | None]], first_n: int) -> dict[str, float | None]:
    """Stream-level figures from per-request values (None: the metric does not apply)."""
    out = {key: mean(values) for key, values in per.items() if key != "efficacy_exact"}
    out["efficacy_exact"] = mean(per["efficacy_exact"])
    out["retention_first100"] = mean(per["efficacy_exact"][:first_n])
    return out


# --- the evaluator -----------------------------------------------------------------------------

_PER_REQUEST = (
    "efficacy_exact",
    "paraphrase_exact",
    "neighbourhood_kept",
    "same_subject_kept",
    "generation_prompt_exact",
    "es",
    "ps",
    "ns",
    "efficacy_token",
    "paraphrase_token",
)


class Evaluator:
    """All metrics of one request stream on one model, with the base pass kept for reuse.

    Args:
        lm: the model (holding the base weights until ``prepare_base`` has run).
        requests: the stream.
        config: evaluation settings.
        unrelated: probes of other knowledge (the bundled audit probe set in the benchmark);
            prompts that also occur in the stream are dropped.
        text: the perplexity sample's lines (WikiText test); empty: no perplexity drift.
    """

    def __init__(
        self,
        lm: LoadedModel,
        requests: Sequence[EditRequest],
        config: EvalConfig | None = None,
        *,
        unrelated: Sequence[LocalityProbe] = (),
        text: Sequence[str] = (),
    ) -> None:
        self.lm = lm
        self.requests = list(requests)
        self.config = config or EvalConfig()
        self.scorer = TeacherForcedScorer(
            lm.model, lm.tokenizer, lm.adapter, batch_tokens=self.config.batch_tokens
        )
        self.judge = Judge(lm, self.scorer, batch_size=self.config.gen_batch_size)
        stream_prompts = {p for r in self.requests for p in _prompts_of(r)}
        own_unrelated = [p for r in self.requests for p in r.locality if p.kind == "unrelated"]
        given = [p for p in unrelated if p.prompt not in stream_prompts]
        self.unrelated_dropped = len(unrelated) - len(given)
        self.unrelated: dict[str, list[LocalityProbe]] = {"probes": given, "stream": own_unrelated}
        self.text_pairs = text_pairs(text) if text else []
        self.base_perplexity: float | None = None
        self.text_tokens = 0
        self._base: dict[Pair, Scored] = {}
        self._capture: list[int] = []  # blocks whose input the base pass keeps
        self._base_answers: dict[str, tuple[str, int, bool, tuple[int, ...]]] = {}
        self._base_exact_true: dict[Pair, bool] = {}
        self._base_verdicts: dict[Pair, Verdict] = {}
        self.base_seconds: float | None = None
        self.base_report: dict[str, Any] | None = None
        first = self.requests[: self.config.curve_locality_requests]
        self.curve_probes = [p for r in first for p in r.locality if p.kind == "neighbourhood"]

    # -- the base pass --

    def prepare_base(self, capture_layers: Sequence[int] = ()) -> dict[str, Any]:
        """Run every metric on the unedited model (call before any edit) and keep the results.

        Args:
            capture_layers: blocks whose input to keep for resumed passes after edits (the
                lowest block each editor changes).
        """
        started, cpu = time.perf_counter(), time.process_time()
        probes = self._kept_probes(self.requests)
        prompts = list(dict.fromkeys(p.prompt for p in probes))
        gold = {p.prompt: p.answer for p in reversed(probes)}  # the first probe's answer wins
        budgets = [self.judge.answer_length((q, gold[q])) + DECODE_SLACK_TOKENS for q in prompts]
        base = self.judge.base_answers(prompts, budgets)
        self._base_answers = {
            q: (a, n, f, ids)
            for q, a, n, f, ids in zip(
                base.prompts,
                base.answers,
                base.max_new_tokens,
                base.forceable,
                base.answer_ids,
                strict=True,
            )
        }
        pairs = self._all_pairs(self.requests) + self.text_pairs
        self._capture = list(capture_layers)
        self._base = forced_map(self.scorer, pairs, capture_layers=capture_layers)
        if self.text_pairs:
            self.base_perplexity, self.text_tokens = perplexity(
                [self._base[p] for p in self.text_pairs]
            )
        trues = [(r.prompt, r.target_true) for r in self.requests if r.target_true]
        verdicts = self.judge.judge(trues, forced=self._base)
        self._base_exact_true = {p: v.ok for p, v in zip(trues, verdicts, strict=True)}
        self.base_report = self._report(self.requests, BASE)
        self.base_seconds = time.perf_counter() - started
        self.base_report["eval_seconds"] = self.base_seconds
        self.base_report["eval_cpu_seconds"] = time.process_time() - cpu
        log.info("base pass done", extra={"pairs": len(pairs), "seconds": round(self.base_seconds)})
        return self.base_report

    # -- measurements on the current model --

    def evaluate(self, requests: Sequence[EditRequest], state: ModelState) -> dict[str, Any]:
        """Every metric over ``requests`` on the current weights (the headline evaluation)."""
        started, cpu = time.perf_counter(), time.process_time()
        report = self._report(requests, state)
        report["eval_seconds"] = time.perf_counter() - started
        # CPU seconds say more than wall seconds on a machine shared with other work.
        report["eval_cpu_seconds"] = time.process_time() - cpu
        return report

    def retained(self, requests: Sequence[EditRequest], state: ModelState) -> list[float]:
        """1.0 where the judge says the edit holds on the current weights, else 0.0."""
        checks = [(r.prompt, r.target_new) for r in requests]
        if state.is_base and all(c in self._base_verdicts for c in checks):
            return [float(self._base_verdicts[c].ok) for c in checks]  # what the base pass found
        verdicts = self.judge.judge(checks, **self._judge_args(checks, state))
        return [float(v.ok) for v in verdicts]

    def curve_locality(self, state: ModelState) -> float | None:
        """``neighbourhood_kept`` over the neighbourhood probes of the stream's first requests."""
        if not self.curve_probes:
            return None
        kept, _ = self._kept(self.curve_probes, state)
        return mean(map(float, kept))

    def known_true_share(self) -> float | None:
        """Share of requests whose true answer the base model gives (the judge)."""
        return mean(map(float, self._base_exact_true.values()))

    def known_true_examples(self, limit: int = 10) -> list[dict[str, str]]:
        """Requests whose true answer the base model already gives (the judge on the base)."""
        out = []
        for r in self.requests:
            if r.target_true and self._base_exact_true.get((r.prompt, r.target_true)):
                out.append({"prompt": r.prompt, "target_true": r.target_true})
                if len(out) >= limit:
                    break
        return out

    # -- internals --

    def _require_base(self) -> None:
        if not self.base_report and not self._base:
            raise RuntimeError("call prepare_base() before evaluating")

    def _scores(self, pairs: Sequence[Pair], state: ModelState) -> dict[Pair, Scored]:
        """Teacher-forced scores of ``pairs`` on the current weights (the base pass when base)."""
        if state.is_base:
            self._require_base()
            missing = [p for p in dict.fromkeys(pairs) if p not in self._base]
            if missing:  # the weights are the base ones: scoring now gives the same, and the
                # block inputs it passes are the ones later resumed passes need
                self._base.update(forced_map(self.scorer, missing, capture_layers=self._capture))
            return self._base
        return forced_map(self.scorer, pairs, resume_layer=state.resume_layer)

    def _judge_args(self, checks: Sequence[Pair], state: ModelState) -> dict[str, Any]:
        forced = self._scores(self.judge.forced_pairs(checks), state)
        return {"resume_layer": 0 if state.is_base else state.resume_layer, "forced": forced}

    def _kept_probes(self, requests: Sequence[EditRequest]) -> list[LocalityProbe]:
        return [p for r in requests for p in r.locality] + self.unrelated["probes"]

    def _base_for(self, probes: Sequence[LocalityProbe]) -> BaseAnswers:
        prompts = list(dict.fromkeys(p.prompt for p in probes))
        rows = [self._base_answers[q] for q in prompts]
        return BaseAnswers(
            tuple(prompts),
            tuple(row[0] for row in rows),
            tuple(row[1] for row in rows),
            tuple(row[2] for row in rows),
            tuple(row[3] for row in rows),
        )

    def _kept(
        self,
        probes: Sequence[LocalityProbe],
        state: ModelState,
        forced: dict[Pair, Scored] | None = None,
    ) -> tuple[list[bool], dict[str, bool]]:
        """Per probe, whether its prompt's greedy answer is the base one; and per prompt."""
        base = self._base_for(probes)
        if state.is_base:
            by_prompt = dict.fromkeys(base.prompts, True)
        else:
            if forced is None:
                forced = self._scores(self.judge.unchanged_pairs(base), state)
            kept, _ = self.judge.unchanged(base, resume_layer=state.resume_layer, forced=forced)
            by_prompt = dict(zip(base.prompts, kept, strict=True))
        return [by_prompt[p.prompt] for p in probes], by_prompt

    def _all_pairs(self, requests: Sequence[EditRequest]) -> list[Pair]:
        """Every pair one report scores (checks with their end token, plain comparisons)."""
        checks: list[Pair] = []
        plain: list[Pair] = []
        for r in requests:
            checks.append((r.prompt, r.target_new))
            checks += [(x, r.target_new) for x in r.rephrases]
            checks += [(x, r.target_new) for x in _generation_prompts(r)]
            if r.target_true:
                plain.append((r.prompt, r.target_true))
                plain += [(x, r.target_true) for x in r.rephrases]
                for p in _neighbours(r):
                    plain += [(p.prompt, r.target_new), (p.prompt, r.target_true)]
        kept: list[Pair] = []
        if self._base_answers:
            kept = self.judge.unchanged_pairs(self._base_for(self._kept_probes(requests)))
        return self.judge.forced_pairs(checks) + plain + kept

    def _report(self, requests: Sequence[EditRequest], state: ModelState) -> dict[str, Any]:
        timings: dict[str, float] = {}
        decoded_before = self.judge.decoded
        t0 = time.perf_counter()
        pairs = list(dict.fromkeys(self._all_pairs(requests)))
        got = self._scores(pairs + self.text_pairs, state)
        timings["teacher_forced"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        checks = list(
            dict.fromkeys(
                c
                for r in requests
                for c in [
                    (r.prompt, r.target_new),
                    *((x, r.target_new) for x in r.rephrases),
                    *((x, r.target_new) for x in _generation_prompts(r)),
                ]
            )
        )
        resume = 0 if state.is_base else state.resume_layer
        verdicts = dict(
            zip(checks, self.judge.judge(checks, resume_layer=resume, forced=got), strict=True)
        )
        if state.is_base:
            self._base_verdicts.update(verdicts)
        probes = self._kept_probes(requests)
        _, kept = self._kept(probes, state, forced=got)
        timings["judge"] = time.perf_counter() - t0

        per: dict[str, list[float | None]] = {k: [] for k in _PER_REQUEST}
        for r in requests:
            new = verdicts[(r.prompt, r.target_new)]
            paras = [verdicts[(x, r.target_new)] for x in r.rephrases]
            per["efficacy_exact"].append(float(new.ok))
            per["efficacy_token"].append(new.scored.token_accuracy)
            per["paraphrase_exact"].append(mean(float(v.ok) for v in paras))
            per["paraphrase_token"].append(mean(v.scored.token_accuracy for v in paras))
            per["generation_prompt_exact"].append(
                mean(float(verdicts[(x, r.target_new)].ok) for x in _generation_prompts(r))
            )
            per["neighbourhood_kept"].append(
                mean(float(kept[p.prompt]) for p in r.locality if p.kind == "neighbourhood")
            )
            per["same_subject_kept"].append(
                mean(float(kept[p.prompt]) for p in r.locality if p.kind == "same_subject")
            )
            es, ps, ns = _probability_scores(r, new.scored, paras, got)
            per["es"].append(es)
            per["ps"].append(ps)
            per["ns"].append(ns)

        summary = summarise(per, self.config.first_n)
        unrelated = {
            source: [float(kept[p.prompt]) for p in probes_]
            for source, probes_ in self.unrelated.items()
        }
        unrelated["stream"] = [
            float(kept[p.prompt]) for r in requests for p in r.locality if p.kind == "unrelated"
        ]
        summary["unrelated_kept"] = mean(unrelated["probes"] + unrelated["stream"])
        drift = None
        if self.text_pairs and self.base_perplexity:
            current, _ = perplexity([got[p] for p in self.text_pairs])
            drift = current / self.base_perplexity - 1.0
        summary["perplexity_drift"] = drift

        report: dict[str, Any] = {"summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary}}
        report["same_subject_kept"] = summary["same_subject_kept"]
        report["generation_prompt_exact"] = summary["generation_prompt_exact"]
        report["unrelated_kept_probes"] = mean(unrelated["probes"])
        report["unrelated_kept_stream"] = mean(unrelated["stream"])
        report["unrelated_n"] = {k: len(v) for k, v in unrelated.items()}
        report["perplexity_base"] = self.base_perplexity
        report["perplexity_tokens"] = self.text_tokens
        report["per_request"] = per  # for subset summaries; the benchmark does not store it

        t0 = time.perf_counter()
        report["fluency"] = self._fluency(requests)
        timings["fluency"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report.update(self._multihop(requests))
        timings["multihop"] = time.perf_counter() - t0
        report["n_requests"] = len(requests)
        report["n_pairs"] = len(pairs) + len(self.text_pairs)
        report["decoded"] = self.judge.decoded - decoded_before
        report["eval_breakdown_seconds"] = timings
        return report

    def _fluency(self, requests: Sequence[EditRequest]) -> float | None:
        prompts: list[str] = []
        for r in requests:
            given = r.extra.get("generation_prompts") or ()
            prompts.append(str(given[0]) if given else r.prompt)  # type: ignore[index]
            if len(prompts) >= self.config.fluency_prompts:
                break
        if not prompts:
            return None
        n = self.config.fluency_new_tokens
        texts = self.judge.generate([(p, n) for p in prompts])
        return mean(ngram_entropy(p + t) for p, t in zip(prompts, texts, strict=True))

    def _multihop(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        cases = [r for r in requests if r.multi_hop]
        if not cases:
            return {"multihop_accuracy": None, "multihop_case_accuracy": None}
        n = self.config.multihop_new_tokens
        jobs = [
            (self.config.multihop_template.format(question=q.question), n)
            for r in cases
            for q in r.multi_hop
        ]
        texts = iter(self.judge.generate(jobs))
        per_question, per_case = [], []
        for r in cases:
            hits = [
                contains_answer(next(texts), (q.answer, *q.answer_aliases)) for q in r.multi_hop
            ]
            per_question += hits
            per_case.append(any(hits))
        return {
            "multihop_accuracy": mean(map(float, per_question)),
            "multihop_case_accuracy": mean(map(float, per_case)),
        }


def _probability_scores(
    r: EditRequest, new: Scored, paras: Sequence[Any], got: dict[Pair, Scored]
) -> tuple[float | None, float | None, float | None]:
    """ES, PS and NS of one request (None where it has no true object other than the new one,
    or no such prompts)."""
    if not r.target_true or r.target_true.strip() == r.target_new.strip():
        return None, None, None
    es = float(prefers(new, got[(r.prompt, r.target_true)]))
    ps = mean(
        float(prefers(v.scored, got[(x, r.target_true)]))
        for x, v in zip(r.rephrases, paras, strict=True)
    )
    ns = mean(
        float(prefers(got[(p.prompt, r.target_true)], got[(p.prompt, r.target_new)]))
        for p in _neighbours(r)
    )
    return es, ps, ns


def _neighbours(r: EditRequest) -> list[LocalityProbe]:
    return [p for p in r.locality if p.kind == "neighbourhood"]


def _generation_prompts(r: EditRequest) -> list[str]:
    """Generation prompts judged for ``generation_prompt_exact`` (the first, when any)."""
    given = r.extra.get("generation_prompts") or ()
    return [str(x) for x in list(given)[:1]]  # type: ignore[call-overload]


def _prompts_of(r: EditRequest) -> list[str]:
    return [r.prompt, *r.rephrases, *(p.prompt for p in r.locality)]


__all__ = [
    "BASE",
    "SUMMARY_KEYS",
    "EvalConfig",
    "Evaluator",
    "ModelState",
    "mean",
    "ngram_entropy",
    "prefers",
    "summarise",
]
