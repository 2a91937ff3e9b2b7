"""Audits: do the applied edits still hold, and does everything else still behave like the base?

An edit is checked when it is applied, but later edits can undo earlier ones and slowly damage
unrelated knowledge. An audit measures, on the current weights:

* retention: each applied fact's greedy answer passes the judge (``editing.checks``), plus the
  teacher-forced token accuracy of its target; every fact up to ``sample_cap``, beyond it a seeded
  sample stratified by edit age, with a 95 % Wilson interval;
* generalisation: the same exact match on the facts' rephrases (by default the first of each);
* locality: the share of a fixed probe set whose greedy answer is still the base model's, and
  the share that still passes against the probe's gold answer;
* perplexity on a small text sample, against the base model's.

Everything runs through one batched teacher-forced pass (``editing.scoring``), which the judge
(``editing.checks.Judge``) reads its verdicts from: each target is scored followed by the
end-of-text token, and a probe is scored on the base model's greedy answer, which the current
model reproduces exactly when every argmax agrees. Only the undecided rest is decoded. When the
caller says which blocks still hold the base weights, the pass resumes above them from cached
residuals.

The base figures (``Baseline``) come from the base weights once and are cached as JSON, keyed by
the base weights, the probe set and the text sample. Reports (``AuditReport``) are JSON files in
the ``factkeeper-audit/v1`` shape that the report renderer reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch

from editing.checks import DECODE_SLACK_TOKENS, BaseAnswers, Judge, forced_map
from editing.models import LoadedModel
from editing.perplexity import TextSampleError, perplexity, text_pairs
from editing.scoring import Pair, TeacherForcedScorer
from monitoring.errors import AuditError, AuditReportError
from monitoring.files import sha256_json, write_atomic
from monitoring.gates import GateDecision, GateThresholds
from monitoring.probes.load import Probe, load_text_sample, probe_set_hash, text_sample_hash
from monitoring.statistics import (
    GeneralisationFigures,
    LocalityFigures,
    PerplexityFigures,
    RetentionFigures,
    stratified_sample,
)

log = logging.getLogger(__name__)

REPORT_SCHEMA = "factkeeper-audit/v1"
BASELINE_SCHEMA = "factkeeper-audit-baseline/v2"

Trigger = Literal["edits", "timer", "requested", "shutdown"]
Action = Literal["promoted", "rolled_back", "warned", "none"]
TRIGGERS: tuple[str, ...] = get_args(Trigger)
ACTIONS: tuple[str, ...] = get_args(Action)

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


# --- the base model's figures ------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """The base model's greedy probe answers and text perplexity, for one probe set and text.

    ``answer_ids[i]`` are the tokens the base model generated for probe ``i`` and
    ``forceable[i]`` says its forced argmax reproduces them (checked on the base weights), so a
    later model gives that answer exactly when its teacher-forced argmax matches every one.
    """

    base_hash: str
    probes_hash: str
    text_hash: str
    answers: tuple[str, ...]
    max_new_tokens: tuple[int, ...]
    forceable: tuple[bool, ...]
    perplexity: float
    text_tokens: int
    answer_ids: tuple[tuple[int, ...], ...] = ()
    seconds: float = field(default=0.0, compare=False)

    @classmethod
    def compute(
        cls,
        lm: LoadedModel,
        probes: Sequence[Probe],
        text: Sequence[str],
        *,
        batch_size: int = 32,
        batch_tokens: int = 2048,
    ) -> Baseline:
        """Run the probes and the text sample on ``lm``, which must hold the BASE weights."""
        if not probes:
            raise AuditError("a baseline needs at least one probe")
        started = time.perf_counter()
        judge = Judge(lm, batch_size=batch_size, batch_tokens=batch_tokens)
        budgets = [judge.answer_length((p.prompt, p.answer)) + DECODE_SLACK_TOKENS for p in probes]
        base = judge.base_answers([p.prompt for p in probes], budgets)
        try:
            ppl, tokens = perplexity(judge.scorer.score(text_pairs(text)))
        except TextSampleError as exc:
            raise AuditError(str(exc)) from None
        baseline = cls(
            base_hash=lm.base_hash,
            probes_hash=probe_set_hash(probes),
            text_hash=text_sample_hash(text),
            answers=base.answers,
            max_new_tokens=base.max_new_tokens,
            forceable=base.forceable,
            perplexity=ppl,
            text_tokens=tokens,
            answer_ids=base.answer_ids,
            seconds=time.perf_counter() - started,
        )
        log.info(
            "audit baseline computed",
            extra={
                "probes": len(probes),
                "forceable": sum(base.forceable),
                "perplexity": round(ppl, 3),
                "seconds": round(baseline.seconds, 1),
            },
        )
        return baseline

    @classmethod
    def load_or_compute(
        cls,
        lm: LoadedModel,
        probes: Sequence[Probe],
        text: Sequence[str],
        folder: Path,
        *,
        batch_size: int = 32,
        batch_tokens: int = 2048,
    ) -> Baseline:
        """The cached baseline for these weights, probes and text, computed and saved if absent.

        Call it while ``lm`` holds the base weights (before restoring any edited version): a
        cache miss computes from whatever weights the model holds.
        """
        probes_hash, text_hash = probe_set_hash(probes), text_sample_hash(text)
        path = folder / f"baseline-{sha256_json([lm.base_hash, probes_hash, text_hash])[:24]}.json"
        cached = cls._read(path)
        if cached is not None and (cached.base_hash, cached.probes_hash, cached.text_hash) == (
            lm.base_hash,
            probes_hash,
            text_hash,
        ):
            log.info("audit baseline loaded from %s", path)
            return cached
        baseline = cls.compute(lm, probes, text, batch_size=batch_size, batch_tokens=batch_tokens)
        write_atomic(path, json.dumps(baseline.to_dict(), indent=1, ensure_ascii=False))
        return baseline

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data = {"schema": BASELINE_SCHEMA, **data}
        for key in ("answers", "max_new_tokens", "forceable"):
            data[key] = list(data[key])
        data["answer_ids"] = [list(ids) for ids in self.answer_ids]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        if data.get("schema") != BASELINE_SCHEMA:
            raise ValueError(f"not a {BASELINE_SCHEMA} file")
        baseline = cls(
            base_hash=str(data["base_hash"]),
            probes_hash=str(data["probes_hash"]),
            text_hash=str(data["text_hash"]),
            answers=tuple(str(a) for a in data["answers"]),
            max_new_tokens=tuple(int(n) for n in data["max_new_tokens"]),
            forceable=tuple(bool(f) for f in data["forceable"]),
            perplexity=float(data["perplexity"]),
            text_tokens=int(data["text_tokens"]),
            answer_ids=tuple(tuple(int(t) for t in ids) for ids in data["answer_ids"]),
            seconds=float(data["seconds"]),
        )
        lengths = {len(baseline.max_new_tokens), len(baseline.forceable), len(baseline.answer_ids)}
        if lengths != {len(baseline.answers)}:
            raise ValueError("per-probe lists differ in length")
        return baseline

    @classmethod
    def _read(cls, path: Path) -> Baseline | None:
        """The cached baseline, or None when absent or unreadable (it is then recomputed)."""
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable audit baseline %s (%s); recomputing", path, exc)
            return None


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
            lm.model, lm.tokenizer, lm.adapter, batch_tokens=batch_tokens
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
            facts: every applied edit, oldest first, one per prompt (its newest target).
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


# --- reports -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditReport:
    """One audit: what it measured and, once judged, the gate's decision and what was done.

    ``Auditor.run`` fills in the figures; ``judged`` adds the verdict, and only a judged report
    is written (schema ``factkeeper-audit/v1``). The file keeps neither ``timings`` nor
    ``failing_total``: a report read back has no timings, and its failing count is the number of
    ids it lists.
    """

    started_at: str  # ISO-8601, UTC
    seconds: float
    edits_total: int
    edits_audited: int
    sampled: bool
    retention: RetentionFigures
    generalisation: GeneralisationFigures
    locality: LocalityFigures
    perplexity: PerplexityFigures
    failing_event_ids: tuple[str, ...]
    """Audited facts that no longer hold, oldest first, at most ``FAILING_IDS_CAP``."""
    failing_total: int
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    """Wall seconds per phase (``teacher_forced_seconds``, ``generation_seconds``), the audit's
    ``cpu_seconds``, and how many pairs were scored and prompts decoded. Not compared: how long
    the audit took is not what it found, and the report file does not keep them."""
    trigger: Trigger | None = None
    """What started the audit; None until judged, like ``gate`` and ``thresholds``."""
    version: str | None = None
    previous_good_version: str | None = None
    gate: GateDecision | None = None
    thresholds: GateThresholds | None = None
    action: Action = "none"
    rolled_back_to: str | None = None
    quarantined_event_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trigger is not None and self.trigger not in TRIGGERS:
            raise AuditReportError(f"trigger {self.trigger!r} is not one of {', '.join(TRIGGERS)}")
        if self.action not in ACTIONS:
            raise AuditReportError(f"action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if len({self.trigger is None, self.gate is None, self.thresholds is None}) > 1:
            raise AuditReportError("a judged audit report needs its trigger, gate and thresholds")

    def judged(
        self,
        *,
        decision: GateDecision,
        thresholds: GateThresholds,
        trigger: Trigger,
        version: str | None,
        previous_good_version: str | None,
        action: Action = "none",
        rolled_back_to: str | None = None,
        quarantined_event_ids: Sequence[str] = (),
        started_at: datetime | None = None,
        seconds: float | None = None,
    ) -> AuditReport:
        """This audit with the gate's decision and what the daemon did about it.

        Args:
            started_at, seconds: of the whole audit step (snapshot, audit, promotion or
                rollback); default: the measurement's own.
        """
        return replace(
            self,
            version=version,
            previous_good_version=previous_good_version,
            started_at=(
                started_at.astimezone(UTC).isoformat(timespec="seconds")
                if started_at is not None
                else self.started_at
            ),
            seconds=seconds if seconds is not None else self.seconds,
            trigger=trigger,
            gate=decision,
            thresholds=thresholds,
            action=action,
            rolled_back_to=rolled_back_to,
            quarantined_event_ids=tuple(quarantined_event_ids),
        )

    @property
    def gate_passed(self) -> bool:
        """Whether the gate judged this audit and let it pass."""
        return self.gate is not None and self.gate.passed

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow (``audit_retention_exact_match``, ...); None ones left out."""
        ci = self.retention.ci95
        values: dict[str, float | int | bool | None] = {
            "audit_edits_total": self.edits_total,
            "audit_edits_audited": self.edits_audited,
            "audit_sampled": self.sampled,
            "audit_retention_exact_match": self.retention.exact_match,
            "audit_retention_token_accuracy": self.retention.token_accuracy,
            "audit_retention_ci95_low": ci[0] if ci else None,
            "audit_retention_ci95_high": ci[1] if ci else None,
            "audit_retention_failing": self.failing_total,
            "audit_generalisation_exact_match": self.generalisation.exact_match,
            "audit_generalisation_n": self.generalisation.n,
            "audit_locality_agreement": self.locality.agreement,
            "audit_locality_gold_accuracy": self.locality.gold_accuracy,
            "audit_locality_n": self.locality.n,
            "audit_perplexity_base": self.perplexity.base,
            "audit_perplexity_current": self.perplexity.current,
            "audit_perplexity_drift": self.perplexity.drift,
            "audit_seconds": self.seconds,
        }
        values.update({f"audit_{name}": value for name, value in self.timings.items()})
        return {k: float(v) for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """The ``factkeeper-audit/v1`` object; only a judged report has one."""
        if self.gate is None or self.thresholds is None:
            raise AuditReportError("an audit report is written once the gate has judged it")
        ci = self.retention.ci95
        return {
            "schema": REPORT_SCHEMA,
            "version": self.version,
            "previous_good_version": self.previous_good_version,
            "started_at": self.started_at,
            "seconds": self.seconds,
            "trigger": self.trigger,
            "edits_total": self.edits_total,
            "edits_audited": self.edits_audited,
            "sampled": self.sampled,
            "retention": {
                "exact_match": self.retention.exact_match,
                "token_accuracy": self.retention.token_accuracy,
                "ci95": list(ci) if ci is not None else None,
            },
            "generalisation": asdict(self.generalisation),
            "locality": asdict(self.locality),
            "perplexity": asdict(self.perplexity),
            "gate": {
                "passed": self.gate.passed,
                "reasons": list(self.gate.reasons),
                "thresholds": self.thresholds.to_dict(),
            },
            "action": self.action,
            "rolled_back_to": self.rolled_back_to,
            "quarantined_event_ids": list(self.quarantined_event_ids),
            "failing_event_ids": list(self.failing_event_ids),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any) -> AuditReport:
        """Parse a report, checking every key of the shape (unknown or missing keys are errors)."""
        _expect_keys(data, _REPORT_KEYS, "report")
        if data["schema"] != REPORT_SCHEMA:
            raise AuditReportError(f"schema {data['schema']!r} is not {REPORT_SCHEMA!r}")
        for name, keys in _NESTED_KEYS.items():
            _expect_keys(data[name], keys, name)
        gate = data["gate"]
        _expect_keys(
            gate["thresholds"], set(GateThresholds.__dataclass_fields__), "gate.thresholds"
        )
        try:
            ci = data["retention"]["ci95"]
            return cls(
                version=_optional_str(data["version"]),
                previous_good_version=_optional_str(data["previous_good_version"]),
                started_at=str(data["started_at"]),
                seconds=float(data["seconds"]),
                trigger=cast(Trigger, data["trigger"]),
                edits_total=int(data["edits_total"]),
                edits_audited=int(data["edits_audited"]),
                sampled=bool(data["sampled"]),
                retention=RetentionFigures(
                    exact_match=_optional_float(data["retention"]["exact_match"]),
                    token_accuracy=_optional_float(data["retention"]["token_accuracy"]),
                    ci95=(float(ci[0]), float(ci[1])) if ci is not None else None,
                ),
                generalisation=GeneralisationFigures(
                    exact_match=_optional_float(data["generalisation"]["exact_match"]),
                    n=int(data["generalisation"]["n"]),
                ),
                locality=LocalityFigures(
                    agreement=float(data["locality"]["agreement"]),
                    gold_accuracy=float(data["locality"]["gold_accuracy"]),
                    n=int(data["locality"]["n"]),
                ),
                perplexity=PerplexityFigures(
                    **{k: float(v) for k, v in data["perplexity"].items()}
                ),
                gate=GateDecision(passed=bool(gate["passed"]), reasons=tuple(gate["reasons"])),
                thresholds=GateThresholds.from_dict(gate["thresholds"]),
                action=cast(Action, data["action"]),
                rolled_back_to=_optional_str(data["rolled_back_to"]),
                quarantined_event_ids=tuple(str(x) for x in data["quarantined_event_ids"]),
                failing_event_ids=tuple(str(x) for x in data["failing_event_ids"]),
                failing_total=len(data["failing_event_ids"]),
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise AuditReportError(f"malformed audit report: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> AuditReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AuditReportError(f"an audit report is not valid JSON: {exc}") from None
        return cls.from_dict(data)


_REPORT_KEYS = {
    "schema", "version", "previous_good_version", "started_at", "seconds", "trigger",
    "edits_total", "edits_audited", "sampled", "retention", "generalisation", "locality",
    "perplexity", "gate", "action", "rolled_back_to", "quarantined_event_ids",
    "failing_event_ids",
}  # fmt: skip
_NESTED_KEYS = {
    "retention": {"exact_match", "token_accuracy", "ci95"},
    "generalisation": {"exact_match", "n"},
    "locality": {"agreement", "gold_accuracy", "n"},
    "perplexity": {"base", "current", "drift"},
    "gate": {"passed", "reasons", "thresholds"},
}


def write_report(folder: Path, report: AuditReport) -> Path:
    """Write ``audit-<UTC yyyymmddTHHMMSS>-v<version>.json`` atomically; returns its path.

    The time is the audit's start; a second report with the same name gets ``-1``, ``-2``, ...
    """
    stamp = datetime.fromisoformat(report.started_at).astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    stem = f"audit-{stamp}-v{report.version if report.version is not None else 'none'}"
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / f"{stem}.json", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    write_atomic(path, report.to_json() + "\n")
    return path


def read_reports(folder: Path) -> list[AuditReport]:
    """Every report in ``folder``, oldest first; an absent folder has none.

    Raises:
        AuditReportError: a file is not a report; the message names it.
    """
    if not folder.is_dir():
        return []
    found: list[tuple[datetime, str, AuditReport]] = []
    for path in sorted(folder.glob("audit-*.json")):
        try:
            report = AuditReport.from_json(path.read_text(encoding="utf-8"))
        except AuditReportError as exc:
            raise AuditReportError(f"{path}: {exc}; move it aside to continue") from None
        when = datetime.fromisoformat(report.started_at).astimezone(UTC)
        found.append((when, path.name, report))
    found.sort(key=lambda item: (item[0], item[1]))
    return [report for _, _, report in found]


# --- helpers -----------------------------------------------------------------------------------


def _expect_keys(value: Any, keys: set[str], where: str) -> None:
    if not isinstance(value, dict):
        raise AuditReportError(f"{where}: expected an object")
    missing, unknown = keys - set(value), set(value) - keys
    if missing or unknown:
        raise AuditReportError(
            f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = [
    "AuditFact",
    "AuditReport",
    "Auditor",
    "Baseline",
    "read_reports",
    "write_report",
]
