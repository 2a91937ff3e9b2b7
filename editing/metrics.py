"""Edit-quality metrics: the measuring stick every editor is judged by.

One ``Evaluator`` per request stream and model. It runs the pre-edit (base) model once over every
prompt the metrics need and keeps those results: the base top-1 predictions define locality, and
while the weights are still the base weights (the ``none`` method) every metric is read from that
cache. After edits it scores the same pairs again, resuming from the lowest edited block.

Definitions (fractions in [0, 1]; per-request values are averaged over requests):

* efficacy / generalization: teacher-forced token accuracy of ``target_new`` after the edit
  prompt / after each rephrase (the ZsRE ``*_acc`` metric of MEND, ROME and MEMIT).
* locality: share of locality-probe answer tokens whose top-1 prediction equals the base model's
  (teacher forcing the probe's gold answer); exactly 1.0 when nothing changed.
* specificity: teacher-forced token accuracy of the probes' gold answers (the papers' figure).
* CounterFact scores: ``efficacy_score`` = P(new) > P(true) on the edit prompt,
  ``paraphrase_score`` the same on rephrases, ``neighborhood_score`` = P(true) > P(new) on probes
  whose answer is the request's true object; P is the per-token geometric mean probability and
  the ``*_magnitude`` values are the mean probability differences.
* gen_exact_match: greedy decoding from the edit prompt, up to the target's token count plus a
  few tokens, starts with the target. The teacher-forced argmax path already fixes greedy's first
  tokens, so decoding actually runs only where that path cannot decide the outcome (a different
  tokenisation of the same text); ``efficacy_all_tokens`` is the plain teacher-forced version.
* fluency: ROME's weighted bi-/tri-gram entropy of greedy generations on a fixed sample.
* multi-hop: a question counts when the greedy answer contains the new answer or an alias as
  whole words; a case counts when any of its questions does (MQuAKE's case accuracy).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from editing.adapters import ArchitectureAdapter
from editing.generation import greedy_generate
from editing.models import LoadedModel
from editing.requests import EditRequest
from editing.scoring import Pair, Scored, TeacherForcedScorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings; none of them changes what a metric means."""

    batch_tokens: int = 2048
    """Padded tokens per teacher-forced batch."""
    gen_extra_tokens: int = 3
    """Greedy tokens decoded beyond the target's own token count for exact match."""
    gen_batch_size: int = 32
    fluency_prompts: int = 16
    """Generations in the fluency sample (the first requests' generation or edit prompts)."""
    fluency_new_tokens: int = 48
    multihop_template: str = "Q: {question}\nA:"
    multihop_new_tokens: int = 16
    curve_locality_requests: int = 100
    """The locality curve uses the probes of this many requests from the start of the stream."""
    first_n: int = 100
    """``retention_first100``: efficacy of the first this-many edits after the last turn."""

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "gen_batch_size", "fluency_new_tokens", "first_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1")
        if self.gen_extra_tokens < 0 or self.fluency_prompts < 0:
            raise ValueError("EvalConfig.gen_extra_tokens and fluency_prompts must be >= 0")


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


# --- metric functions on scored pairs --------------------------------------------------------


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean, or None for no values (a metric that does not apply)."""
    values = list(values)
    return sum(values) / len(values) if values else None


def token_accuracy(scored: Scored) -> float:
    """Share of answer tokens that are the top-1 prediction under teacher forcing."""
    return scored.token_accuracy


def unchanged_share(before: Scored, after: Scored) -> float:
    """Share of answer positions whose top-1 prediction is the same before and after."""
    if before.answer_ids != after.answer_ids:
        raise ValueError("locality compares the same teacher-forced answer")
    same = sum(a == b for a, b in zip(before.argmax_ids, after.argmax_ids, strict=True))
    return same / len(before.argmax_ids)


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


def starts_with_target(generated: str, target: str) -> bool:
    """The generation criterion: the decoded continuation starts with the target text."""
    return generated.lstrip().startswith(target.strip())


def greedy_match_from_argmax(
    scored: Scored, target: str, piece: Callable[[int], str]
) -> bool | None:
    """Whether greedy decoding starts with ``target``, when the teacher-forced path decides it.

    Greedy decoding emits the target's first ``k`` tokens exactly when they are the teacher-forced
    argmax, and then emits the argmax at position ``k``. So the decoded text is known up to the
    first mismatch; None means it is still consistent with the target through a different
    tokenisation and only decoding can tell.
    """
    if scored.all_correct:
        return True
    pairs = zip(scored.answer_ids, scored.argmax_ids, strict=True)
    k = next(i for i, (a, b) in enumerate(pairs) if a != b)
    produced = "".join(piece(t) for t in scored.answer_ids[:k]) + piece(scored.argmax_ids[k])
    if "\ufffd" in produced:  # a token that splits a UTF-8 character: decode to be sure
        return None
    text, want = produced.lstrip(), target.strip()
    if not text:
        return None
    if text.startswith(want):
        return True
    return None if want.startswith(text) else False


def matches_answer(generated: str, answers: Sequence[str]) -> bool:
    """Multi-hop criterion: an answer or alias occurs as whole words in the first line."""
    line = generated.strip().split("\n", 1)[0].lower()
    return any(
        re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", line) for a in answers if a.strip()
    )


# --- the evaluator -----------------------------------------------------------------------------


@dataclass
class _Generations:
    """Greedy outputs the metrics need, keyed by (prompt, max_new_tokens)."""

    texts: dict[tuple[str, int], str] = field(default_factory=dict)


class Evaluator:
    """All metrics of one request stream on one model, with the base pass kept for reuse."""

    def __init__(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: EvalConfig | None = None
    ) -> None:
        self.lm = lm
        self.requests = list(requests)
        self.config = config or EvalConfig()
        self.scorer = TeacherForcedScorer(
            lm.model, lm.tokenizer, lm.adapter, batch_tokens=self.config.batch_tokens
        )
        self._base: dict[Pair, Scored] = {}
        self._base_gen = _Generations()
        self.base_seconds: float | None = None
        self.base_report: dict[str, Any] | None = None
        self._base_verdicts: dict[tuple[str, Pair], bool] = {}
        first = self.requests[: self.config.curve_locality_requests]
        self.curve_locality_pairs: list[Pair] = [_probe_pair(p) for r in first for p in r.locality]

    # -- the base pass --

    def prepare_base(self, capture_layers: Sequence[int] = ()) -> dict[str, Any]:
        """Run every metric on the unedited model (call before any edit) and keep the results.

        Args:
            capture_layers: blocks whose input to keep for resumed passes after edits (the
                lowest block each editor changes).
        """
        started, cpu = time.perf_counter(), time.process_time()
        pairs = list(dict.fromkeys(self._all_pairs(self.requests) + self.curve_locality_pairs))
        scored = self.scorer.score(pairs, resume_layer=0, capture_layers=capture_layers)
        self._base = dict(zip(pairs, scored, strict=True))
        self.base_report = self._report(self.requests, BASE)
        self.base_seconds = time.perf_counter() - started
        self.base_report["eval_seconds"] = self.base_seconds
        self.base_report["eval_cpu_seconds"] = time.process_time() - cpu
        log.info(
            "base pass done",
            extra={"pairs": len(pairs), "seconds": round(self.base_seconds, 1)},
        )
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

    def efficacies(self, requests: Sequence[EditRequest], state: ModelState) -> list[float]:
        """Efficacy of each request on the current weights (retention, efficacy after edit)."""
        pairs = [(r.prompt, r.target_new) for r in requests]
        return [s.token_accuracy for s in self._score(pairs, state)]

    def curve_locality(self, state: ModelState) -> float | None:
        """Locality over the fixed probe sample of the stream's first requests."""
        if not self.curve_locality_pairs:
            return None
        after = self._score(self.curve_locality_pairs, state)
        return mean(
            unchanged_share(self._base[p], s)
            for p, s in zip(self.curve_locality_pairs, after, strict=True)
        )

    def known_true_examples(self, limit: int = 10) -> list[dict[str, str]]:
        """Requests whose true answer the base model already produces under greedy decoding."""
        out = []
        for r in self.requests:
            if r.target_true and self._base_verdicts.get(
                ("gen_exact_match_true", (r.prompt, r.target_true))
            ):
                out.append({"prompt": r.prompt, "target_true": r.target_true})
                if len(out) >= limit:
                    break
        return out

    # -- internals --

    def _score(self, pairs: Sequence[Pair], state: ModelState) -> list[Scored]:
        if state.is_base:
            self._require_base()
            return [self._base[p] for p in pairs]
        return self.scorer.score(pairs, resume_layer=state.resume_layer)

    def _require_base(self) -> None:
        if not self._base:
            raise RuntimeError("call prepare_base() before evaluating")

    def _all_pairs(self, requests: Sequence[EditRequest]) -> list[Pair]:
        pairs: list[Pair] = []
        for r in requests:
            pairs.append((r.prompt, r.target_new))
            pairs += [(x, r.target_new) for x in r.rephrases]
            pairs += [_probe_pair(p) for p in r.locality]
            if r.target_true:
                pairs.append((r.prompt, r.target_true))
                pairs += [(x, r.target_true) for x in r.rephrases]
                pairs += [(p.prompt, r.target_new) for p in _neighbours(r)]
        return pairs

    def _report(self, requests: Sequence[EditRequest], state: ModelState) -> dict[str, Any]:
        self._require_base()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        pairs = list(dict.fromkeys(self._all_pairs(requests)))
        got = dict(zip(pairs, self._score(pairs, state), strict=True))
        timings["teacher_forced"] = time.perf_counter() - t0

        def acc(prompt: str, answer: str) -> float:
            return got[(prompt, answer)].token_accuracy

        per = {
            "efficacy": [acc(r.prompt, r.target_new) for r in requests],
            "generalization": [
                mean(acc(x, r.target_new) for x in r.rephrases) for r in requests if r.rephrases
            ],
            "locality": [
                mean(
                    unchanged_share(self._base[_probe_pair(p)], got[_probe_pair(p)])
                    for p in r.locality
                )
                for r in requests
                if r.locality
            ],
            "specificity": [
                mean(got[_probe_pair(p)].token_accuracy for p in r.locality)
                for r in requests
                if r.locality
            ],
        }
        report: dict[str, Any] = {k: mean(v) for k, v in per.items()}
        report["efficacy_all_tokens"] = mean(
            float(got[(r.prompt, r.target_new)].all_correct) for r in requests
        )
        report["retention_first100"] = mean(per["efficacy"][: self.config.first_n])
        report.update(self._counterfact_scores(requests, got))

        t0 = time.perf_counter()
        report.update(self._generation_match(requests, got, state))
        timings["generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report["fluency"] = self._fluency(requests, state)
        timings["fluency"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report.update(self._multihop(requests, state))
        timings["multihop"] = time.perf_counter() - t0
        report["n_requests"] = len(requests)
        report["n_pairs"] = len(pairs)
        report["eval_breakdown_seconds"] = timings
        return report

    def _counterfact_scores(
        self, requests: Sequence[EditRequest], got: dict[Pair, Scored]
    ) -> dict[str, float | None]:
        eff, eff_mag, par, par_mag, nbr, nbr_mag = [], [], [], [], [], []
        for r in requests:
            if not r.target_true:
                continue
            new, true = got[(r.prompt, r.target_new)], got[(r.prompt, r.target_true)]
            eff.append(float(prefers(new, true)))
            eff_mag.append(new.prob - true.prob)
            if r.rephrases:
                pn = [got[(x, r.target_new)] for x in r.rephrases]
                pt = [got[(x, r.target_true)] for x in r.rephrases]
                par.append(mean(float(prefers(a, b)) for a, b in zip(pn, pt, strict=True)))
                par_mag.append(mean(a.prob - b.prob for a, b in zip(pn, pt, strict=True)))
            probes = _neighbours(r)
            if probes:
                nt = [got[(p.prompt, r.target_true)] for p in probes]
                nn_ = [got[(p.prompt, r.target_new)] for p in probes]
                nbr.append(mean(float(prefers(a, b)) for a, b in zip(nt, nn_, strict=True)))
                nbr_mag.append(mean(a.prob - b.prob for a, b in zip(nt, nn_, strict=True)))
        return {
            "efficacy_score": mean(eff),
            "efficacy_magnitude": mean(eff_mag),
            "paraphrase_score": mean(par),
            "paraphrase_magnitude": mean(par_mag),
            "neighborhood_score": mean(nbr),
            "neighborhood_magnitude": mean(nbr_mag),
        }

    def _generation_match(
        self, requests: Sequence[EditRequest], got: dict[Pair, Scored], state: ModelState
    ) -> dict[str, Any]:
        """Greedy exact match for the new target and, where known, the old one."""
        tok = self.lm.tokenizer
        pieces: dict[int, str] = {}

        def piece(token: int) -> str:
            if token not in pieces:
                pieces[token] = tok.decode([token])
            return pieces[token]

        out: dict[str, Any] = {}
        decoded = 0
        for key, attr in (
            ("gen_exact_match", "target_new"),
            ("gen_exact_match_true", "target_true"),
        ):
            wanted = [(r.prompt, getattr(r, attr)) for r in requests if getattr(r, attr)]
            verdicts = {p: greedy_match_from_argmax(got[p], p[1], piece) for p in wanted}
            undecided = [p for p, v in verdicts.items() if v is None]
            texts = self._generate(
                [(p[0], len(got[p].answer_ids) + self.config.gen_extra_tokens) for p in undecided],
                state,
            )
            for p, text in zip(undecided, texts, strict=True):
                verdicts[p] = starts_with_target(text, p[1])
            decoded += len(undecided)
            out[key] = mean(float(verdicts[p]) for p in wanted)
            if state.is_base:
                self._base_verdicts.update(((key, p), v) for p, v in verdicts.items())
        out["gen_decoded"] = decoded
        return out

    def _generate(self, jobs: Sequence[tuple[str, int]], state: ModelState) -> list[str]:
        """Greedy continuations of (prompt, max_new_tokens) jobs; base results are kept."""
        cache = self._base_gen.texts
        if state.is_base:
            todo = [j for j in dict.fromkeys(jobs) if j not in cache]
        else:
            todo = list(dict.fromkeys(jobs))
        fresh: dict[tuple[str, int], str] = {}
        by_length: dict[int, list[str]] = {}
        for prompt, n in todo:
            by_length.setdefault(n, []).append(prompt)
        for n, prompts in sorted(by_length.items()):
            texts = greedy_generate(
                self.lm.model, self.lm.tokenizer, prompts, n, self.config.gen_batch_size
            )
            fresh.update(((p, n), t) for p, t in zip(prompts, texts, strict=True))
        if state.is_base:
            cache.update(fresh)
            return [cache[j] for j in jobs]
        return [fresh[j] for j in jobs]

    def _fluency(self, requests: Sequence[EditRequest], state: ModelState) -> float | None:
        prompts: list[str] = []
        for r in requests:
            given = r.extra.get("generation_prompts") or ()
            prompts.append(str(given[0]) if given else r.prompt)
            if len(prompts) >= self.config.fluency_prompts:
                break
        if not prompts:
            return None
        n = self.config.fluency_new_tokens
        texts = self._generate([(p, n) for p in prompts], state)
        return mean(ngram_entropy(p + t) for p, t in zip(prompts, texts, strict=True))

    def _multihop(self, requests: Sequence[EditRequest], state: ModelState) -> dict[str, Any]:
        cases = [r for r in requests if r.multi_hop]
        if not cases:
            return {"multihop_accuracy": None, "multihop_case_accuracy": None}
        n = self.config.multihop_new_tokens
        jobs = [
            (self.config.multihop_template.format(question=q.question), n)
            for r in cases
            for q in r.multi_hop
        ]
        texts = iter(self._generate(jobs, state))
        per_question, per_case = [], []
        for r in cases:
            hits = [matches_answer(next(texts), (q.answer, *q.answer_aliases)) for q in r.multi_hop]
            per_question += hits
            per_case.append(any(hits))
        return {
            "multihop_accuracy": mean(map(float, per_question)),
            "multihop_case_accuracy": mean(map(float, per_case)),
        }


def _probe_pair(probe: Any) -> Pair:
    return (probe.prompt, probe.answer)


def _neighbours(r: EditRequest) -> list[Any]:
    """Locality probes that share the request's true object (CounterFact neighbourhood)."""
    if not r.target_true:
        return []
    return [p for p in r.locality if p.answer.strip() == r.target_true.strip()]


__all__ = [
    "BASE",
    "EvalConfig",
    "Evaluator",
    "ModelState",
    "greedy_match_from_argmax",
    "matches_answer",
    "mean",
    "ngram_entropy",
    "prefers",
    "starts_with_target",
    "token_accuracy",
    "unchanged_share",
]
