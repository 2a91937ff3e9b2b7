"""The auditor: do the applied edits still hold, and does everything else behave like the base?

An edit is checked when it is applied, but later edits can undo earlier ones and slowly damage
unrelated knowledge. An audit measures, on the current weights:

* retention: each fact's greedy answer passes the judge (``editing.checks``), plus the
  teacher-forced token accuracy of its target (the daemon passes the newest correction of each
  fact, its live set); every fact up to ``sample_cap``, beyond it a seeded
  sample stratified by edit age, with a 95 % Wilson interval (``monitoring.statistics``);
* generalisation: the same exact match on the facts' rephrases (by default the first of each);
* locality: the share of a fixed probe set (``monitoring.probes``) whose greedy answer is still
  the base model's, and the share that still passes against the probe's gold answer;
* perplexity on a small text sample, against the base model's.

Everything runs through one batched teacher-forced pass (``editing.scoring``), which the judge
(``editing.checks.Judge``) reads its verdicts from: each target is scored followed by the
end-of-text token, and a probe is scored on the base model's greedy answer, which the current
model reproduces exactly when every argmax agrees. Only the undecided rest is decoded. When the
caller says which blocks still hold the base weights, the pass resumes above them from cached
residuals.

The base figures come from ``monitoring.baseline``; the result is an unjudged ``AuditReport``
(``monitoring.audit_report``), which the daemon judges with the gate and writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from editing.checks import BaseAnswers, Judge, forced_map
from editing.models import LoadedModel
from editing.perplexity import TextSampleError, perplexity, text_pairs
from editing.residual_store import ResidualStore
from editing.scoring import Pair, TeacherForcedScorer
from monitoring.audit_report import AuditReport
from monitoring.baseline import Baseline
from monitoring.errors import AuditError
from monitoring.probes.load import Probe, load_text_sample, probe_set_hash, text_sample_hash
from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    PerplexityFigures,
    RetentionFigures,
    stratified_sample,
)

log = logging.getLogger(__name__)

FAILING_IDS_CAP = 100
"""At most this many ids of facts that no longer hold are listed (all are counted)."""


# --- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFact:
    """One applied edit to check: the newest target for its prompt (the caller picks it)."""

    event_id: str
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt.strip() or not self.target.strip():
            raise ValueError(f"{self.event_id}: an audited fact needs a prompt and a target")


# --- the audit ---------------------------------------------------------------------------------


class Auditor:
    """Audits one model against one probe set, text sample and baseline.

    It keeps a ``TeacherForcedScorer``: its tokenisation cache, and, when ``run`` is told the
    lower blocks still hold the base weights, the residual stream entering the lowest edited
    block, so later audits run only the blocks above it.
    """

    def __init__(
        self,
        lm: LoadedModel,
        probes: Sequence[Probe],
        baseline: Baseline,
        *,
        sample_cap: int,
        seed: int = 0,
        batch_size: int = 32,
        batch_tokens: int = 2048,
        text: Sequence[str] | None = None,
        rephrases_per_fact: int | None = 1,
        residual_cache_pairs: int = 6000,
        residual_store: ResidualStore | None = None,
    ) -> None:
        """
        Args:
            lm: the model whose current weights are audited.
            probes: the locality probe set the baseline was computed for.
            baseline: the base model's figures (``Baseline.load_or_compute``).
            sample_cap: audit every fact up to this many, beyond it a stratified sample.
            seed: seed of the sample.
            batch_size: prompts per batch when decoding.
            batch_tokens: padded tokens per teacher-forced batch.
            text: the perplexity text sample (``load_text_sample``); None: the probes as
                statements, the default of ``load_text_sample``.
            rephrases_per_fact: generalisation checks each audited fact's first this many
                rephrases (None: all). An event may carry ten, and each costs about what its
                fact costs; one per fact already gives as many checks as there are facts.
            residual_cache_pairs: most sequences whose residuals are kept for resumed passes
                (about 28 KB each for SmolLM2); past it the cache starts again.
            residual_store: keeps those residuals on disk too, so the first audit after a
                restart does not run the unedited lower blocks again (None: memory only).
        """
        if sample_cap < 1 or batch_size < 1:
            raise ValueError("sample_cap and batch_size must be >= 1")
        if residual_cache_pairs < 0 or (rephrases_per_fact is not None and rephrases_per_fact < 0):
            raise ValueError("residual_cache_pairs and rephrases_per_fact must be >= 0")
        self.lm = lm
        self.probes = list(probes)
        self.text = list(text) if text is not None else load_text_sample(None, self.probes)
        self.baseline = baseline
        self.sample_cap = sample_cap
        self.seed = seed
        self.batch_size = batch_size
        self.rephrases_per_fact = rephrases_per_fact
        self.residual_cache_pairs = residual_cache_pairs
        self._check_baseline()
        self.scorer = TeacherForcedScorer(
            lm.model, lm.tokenizer, lm.adapter, batch_tokens=batch_tokens, store=residual_store
        )
        self.judge = Judge(lm, self.scorer, batch_size=batch_size)
        try:
            self._text_pairs = text_pairs(self.text)
        except TextSampleError as exc:
            raise AuditError(str(exc)) from None
        b = baseline
        self._base_answers = BaseAnswers(
            tuple(p.prompt for p in self.probes),
            b.answers,
            b.max_new_tokens,
            b.forceable,
            b.answer_ids,
        )
        self._gold_checks = [(p.prompt, p.answer) for p in self.probes]
        self._resumed: set[Pair] = set()
        self._resumed_layer = 0

    def _check_baseline(self) -> None:
        b = self.baseline
        problems = []
        if b.base_hash != self.lm.base_hash:
            problems.append(
                f"other base weights ({b.base_hash[:12]}, not {self.lm.base_hash[:12]})"
            )
        if b.probes_hash != probe_set_hash(self.probes) or len(b.answers) != len(self.probes):
            problems.append("another probe set")
        if b.text_hash != text_sample_hash(self.text):
            problems.append("another text sample")
        if problems:
            raise AuditError(
                "the audit baseline belongs to "
                + ", ".join(problems)
                + "; build it with Baseline.load_or_compute for this model, probes and text"
            )

    @torch.no_grad()
    def run(self, facts: Sequence[AuditFact], *, resume_layer: int = 0) -> AuditReport:
        """Audit the current weights.

        Args:
            facts: the facts to check, oldest first, one per fact (the daemon: its live set).
            resume_layer: blocks below this index hold the base weights (the lowest edited
                block, ``ModelState.from_touched(...).resume_layer``); 0 runs every block.

        Returns:
            The figures, not yet judged by the gate; the model is not changed.
        """
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        started, cpu_started = time.perf_counter(), time.process_time()
        chosen = [facts[i] for i in stratified_sample(len(facts), self.sample_cap, self.seed)]
        rephrased = [(x, f.target) for f in chosen for x in f.rephrases[: self.rephrases_per_fact]]
        checks = list(dict.fromkeys([(f.prompt, f.target) for f in chosen] + rephrased))
        all_checks = checks + self._gold_checks

        t0 = time.perf_counter()
        judge = self.judge
        forced_checks = judge.forced_pairs(all_checks)
        pairs = forced_checks + judge.unchanged_pairs(self._base_answers) + self._text_pairs
        self._bound_residuals(pairs, resume_layer)
        forced = forced_map(self.scorer, pairs, resume_layer=resume_layer)
        teacher_forced = time.perf_counter() - t0

        t0 = time.perf_counter()
        decoded_before = judge.decoded
        judged = judge.judge(all_checks, resume_layer=resume_layer, forced=forced)
        verdicts = {c: v for c, v in zip(all_checks, judged, strict=True)}
        kept, _ = judge.unchanged(self._base_answers, resume_layer=resume_layer, forced=forced)
        locality = LocalityFigures.of(kept, [verdicts[c].ok for c in self._gold_checks])
        decoded = judge.decoded - decoded_before
        generation = time.perf_counter() - t0

        held = [verdicts[(f.prompt, f.target)].ok for f in chosen]
        failing = [f.event_id for f, ok in zip(chosen, held, strict=True) if not ok]
        generalised = [verdicts[pair].ok for pair in rephrased]
        current, _ = perplexity([forced[p] for p in self._text_pairs])
        result = AuditReport(
            started_at=started_at,
            seconds=time.perf_counter() - started,
            edits_total=len(facts),
            edits_audited=len(chosen),
            sampled=len(chosen) < len(facts),
            retention=RetentionFigures.of(
                held, (verdicts[(f.prompt, f.target)].scored.token_accuracy for f in chosen)
            ),
            generalisation=GeneralisationFigures.of(generalised),
            locality=locality,
            perplexity=PerplexityFigures.of(self.baseline.perplexity, current),
            failing_event_ids=tuple(failing[:FAILING_IDS_CAP]),
            failing_total=len(failing),
            timings={
                "teacher_forced_seconds": teacher_forced,
                "generation_seconds": generation,
                # CPU seconds say more than wall seconds on a machine shared with other work.
                "cpu_seconds": time.process_time() - cpu_started,
                "pairs_scored": float(len(pairs)),
                "prompts_decoded": float(decoded),
            },
        )
        log.info(
            "audit done",
            extra={
                "edits": result.edits_total,
                "audited": result.edits_audited,
                "retention": result.retention.exact_match,
                "locality": locality.agreement,
                "seconds": round(result.seconds, 1),
            },
        )
        return result

    def _bound_residuals(self, pairs: Sequence[Pair], resume_layer: int) -> None:
        """Keep the scorer's residual cache bounded: restart it on another layer or past the cap."""
        if resume_layer <= 0:
            return
        fresh = set(pairs) - self._resumed
        too_many = len(self._resumed) + len(fresh) > self.residual_cache_pairs
        if resume_layer != self._resumed_layer or too_many:
            self.scorer.clear_residuals()
            self._resumed = set()
            self._resumed_layer = resume_layer
        self._resumed.update(pairs)


__all__ = [
    "AuditFact",
    "Auditor",
]
