"""Turning validated events into model edits: each edit is kept completely or not at all.

A batch is applied with the configured editor, then every edit is post-checked: the model's
greedy answer to the prompt must now start with the new target. The edits that do not take go
down a retry ladder, and the ones that did stay:

1. The batch is undone (bit-exact) and the edits that passed are re-applied as one unit and
   post-checked again; any that no longer take join the failures. This repeats until a unit
   takes completely or fewer than two edits are left, at most ``editor.subset_rounds`` times.
2. Every edit not kept is applied alone with the configured editor, then alone with each rung of
   ``editor.retry_ladder`` in turn (by default FT-L again with more Adam steps, NSE with the
   value network again with Adam values), undone each time it does not take.
3. An edit no rung made take is reported as failed (it goes to the DLQ) with a reason that names
   every rung tried and what the model answered.

The units that were finally kept are what the journal records (``batch_id``, and ``retry_rung``
for a unit a ladder rung applied) and what replay re-applies, in order, to reach the same weights
after a restart: from the unit's stored deltas (``replay_stored``) or else with the editor that
applied it (``replay``). A rung that the journal names but
the configured ladder no longer has stops replay with ``RetryLadderChangedError``. The rungs of
an editor that keeps a memory of past edits (NSE) are its variants, which share that memory; the
safeguards' editors have none, and no such editor can be a rung of another.

An editor that fails with a *transient* error (``TransientRetry``: out of memory by default) is
retried a bounded number of times with a doubling backoff, the weights rebuilt from the journal
before each try; only then are its events failed. Other unexpected errors fail them at once,
without climbing the ladder.

A correction of a fact an earlier edit already changed is applied on top of it (the earlier
edit stays in the weights and in the journal, superseded: ``daemon.records.live_set``); audits
check only the newest correction of each fact.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from daemon.config import EditorSettings
from daemon.errors import RetryLadderChangedError
from daemon.ingest.events import FactCorrection
from editing.checks import Judge, Verdict
from editing.editors.base import EditError, Editor, EditResult, write_deltas
from editing.models import LoadedModel
from editing.requests import EditRequest, LocalityProbe

log = logging.getLogger(__name__)


def to_request(event: FactCorrection) -> EditRequest:
    """The editing library's view of an event."""
    return EditRequest(
        request_id=event.id,
        prompt=event.prompt,
        subject=event.subject,
        target_new=event.target_new,
        target_true=event.target_old,
        rephrases=tuple(event.rephrases),
        locality=tuple(LocalityProbe(p.prompt, p.answer) for p in event.locality_probes),
    )


@dataclass(frozen=True)
class TransientRetry:
    """Which editor errors are worth retrying, and how often (``editor.transient_*``)."""

    retries: int = 0
    backoff_s: float = 0.5
    error_types: tuple[str, ...] = ("torch.OutOfMemoryError",)
    error_messages: tuple[str, ...] = ("out of memory",)

    @classmethod
    def from_settings(cls, editor: EditorSettings) -> TransientRetry:
        return cls(
            retries=editor.transient_retries,
            backoff_s=editor.transient_backoff_s,
            error_types=tuple(editor.transient_error_types),
            error_messages=tuple(editor.transient_error_messages),
        )

    def is_transient(self, exc: BaseException) -> bool:
        for cls in type(exc).__mro__:
            if cls.__qualname__ in self.error_types:
                return True
            if f"{cls.__module__}.{cls.__qualname__}" in self.error_types:
                return True
        message = str(exc).lower()
        return any(m.lower() in message for m in self.error_messages)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return self.backoff_s * 2 ** (attempt - 1)


#: The ``stage`` at which an applied unit took, on its way down the retry ladder (the ``rung``
#: label of ``factkeeper_edits_by_rung``; the journal keeps only a rung's spec, ``retry_rung``):
#: ``first`` the call that first tried the edit, ``subset`` a batch re-applied without the edits
#: that failed, ``alone`` the configured editor alone after that, ``rung<i>`` the ladder's rungs.
FIRST, SUBSET, ALONE = "first", "subset", "alone"


def rung_stage(index: int) -> str:
    """The stage label of the ladder's rung ``index`` (1-based)."""
    return f"rung{index}"


def rung_spec(method: str, options: Mapping[str, object]) -> str:
    """A rung as the journal records it (``retry_rung``): canonical JSON of method and options."""
    return json.dumps(
        {"method": method, "options": dict(options)}, sort_keys=True, separators=(",", ":")
    )


@dataclass(frozen=True)
class Rung:
    """One built rung of the retry ladder (``editor.retry_ladder``)."""

    index: int
    """Position in the configured ladder, from 1."""
    spec: str
    """``rung_spec`` of the method and the options its editor was built with."""
    editor: Editor
    label: str
    """For failure reasons, e.g. ``rung 1 (ft num_steps=40)``."""

    @property
    def stage(self) -> str:
        return rung_stage(self.index)


@dataclass
class AppliedUnit:
    """Events applied together in one editor call and kept: the unit of replay."""

    batch_id: str
    events: list[FactCorrection]
    result: EditResult
    seconds: float
    stage: str = FIRST
    """Where on the retry ladder the unit took (``FIRST``, ``SUBSET``, ``ALONE``, ``rung<i>``)."""
    rung: Rung | None = None
    """The ladder rung that applied the unit; None: the configured editor."""

    @property
    def retry_rung(self) -> str | None:
        """What the journal records for this unit (None: the configured editor)."""
        return self.rung.spec if self.rung is not None else None


@dataclass
class BatchOutcome:
    applied: list[AppliedUnit] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # event id -> reason

    @property
    def applied_ids(self) -> list[str]:
        return [e.id for unit in self.applied for e in unit.events]


@dataclass
class _Attempt:
    unit: AppliedUnit | None
    failures: dict[str, str]  # event id -> reason, when ``unit`` is None
    crashed: bool = False  # an unexpected editor error: the ladder stops here


class EditApplier:
    """Applies events to one loaded model with one editor and its retry ladder.

    ``rebuild`` makes the weights what the journal says (the daemon passes its restore + replay).
    With it, an editor that fails in an unexpected way (not ``EditError``, so the weights may be
    half-written) costs a rebuild and marks the events failed instead of crashing the daemon on
    the same record after every restart; without it, the error propagates. A transient error
    (``retry``) is retried after the rebuild, up to ``retry.retries`` times. ``ladder`` holds
    the rungs an edit that did not take alone is tried with (``build_ladder`` in the service).
    """

    def __init__(
        self,
        lm: LoadedModel,
        editor: Editor,
        rebuild: Callable[[], None] | None = None,
        retry: TransientRetry | None = None,
        sleep: Callable[[float], None] = time.sleep,
        *,
        ladder: Sequence[Rung] = (),
        subset_rounds: int = 3,
    ) -> None:
        if subset_rounds < 1:
            raise ValueError("subset_rounds must be >= 1")
        self.lm = lm
        self.editor = editor
        self.rebuild = rebuild
        self.judge = Judge(lm)
        self.retry = retry or TransientRetry()
        self.sleep = sleep
        self.ladder = tuple(ladder)
        self.subset_rounds = subset_rounds

    def apply(self, events: Sequence[FactCorrection]) -> BatchOutcome:
        """Apply ``events``; every event ends up in ``applied`` or ``failed``, never half-done."""
        outcome = BatchOutcome()
        if not events:
            return outcome
        left = list(events)
        batched = len(left) > 1 and self.editor.supports_batch
        if batched:
            self._apply_subsets(left, outcome)
            kept = set(outcome.applied_ids)
            left = [e for e in left if e.id not in kept]
            if left:
                log.info("edits left for the retry ladder", extra={"n": len(left)})
        for event in left:
            self._climb(event, outcome, tried_before=batched)
        return outcome

    def _apply_subsets(self, events: list[FactCorrection], outcome: BatchOutcome) -> None:
        """The batch, then the edits of it that passed as one unit, until one unit takes.

        Each round drops at least one edit, and ``subset_rounds`` bounds the re-applications.
        """
        subset = events
        for round_ in range(1 + self.subset_rounds):
            attempt = self._try_unit(subset, outcome, stage=FIRST if round_ == 0 else SUBSET)
            if attempt.unit is not None:
                outcome.applied.append(attempt.unit)
                return
            subset = [e for e in subset if e.id not in attempt.failures]
            if len(subset) < 2:  # one edit left is what the ladder tries first anyway
                return
            log.info(
                "batch did not fully take; re-applying the edits that did",
                extra={"n": len(subset), "round": round_ + 1},
            )

    def _climb(self, event: FactCorrection, outcome: BatchOutcome, *, tried_before: bool) -> None:
        """``event`` alone with the configured editor, then with each rung, until one takes."""
        tried: list[tuple[str, str]] = []
        editors: list[Rung | None] = [None, *self.ladder]
        for rung in editors:
            if rung is None:
                stage, label = (ALONE if tried_before else FIRST), f"alone ({self.editor.name})"
            else:
                stage, label = rung.stage, rung.label
            attempt = self._try_unit([event], outcome, stage=stage, rung=rung)
            if attempt.unit is not None:
                outcome.applied.append(attempt.unit)
                return
            tried.append((label, attempt.failures.get(event.id, "edit did not take")))
            if attempt.crashed:
                break
        if len(tried) == 1:
            outcome.failed[event.id] = tried[0][1]
        else:
            outcome.failed[event.id] = "; ".join(f"{label}: {why}" for label, why in tried)

    def editor_of(self, unit: AppliedUnit) -> Editor:
        """The editor that applied ``unit`` (its rung's, or the configured one)."""
        return unit.rung.editor if unit.rung is not None else self.editor

    def undo(self, unit: AppliedUnit) -> None:
        """Restore the weights ``unit`` changed, with the editor that applied it."""
        self.editor_of(unit).undo(self.lm, unit.result)

    def rung_for(self, retry_rung: str | None, batch_id: str = "?") -> Rung | None:
        """The configured rung the journal's ``retry_rung`` names (None: the configured editor).

        Raises:
            RetryLadderChangedError: the ladder has no such rung any more.
        """
        if retry_rung is None:
            return None
        for rung in self.ladder:
            if rung.spec == retry_rung:
                return rung
        configured = "; ".join(r.spec for r in self.ladder) or "none"
        raise RetryLadderChangedError(
            f"journal unit {batch_id} was applied by retry rung {retry_rung}, which "
            f"editor.retry_ladder no longer configures (its rungs now: {configured}); replaying "
            "it with another editor would change the weights: restore that rung to start"
        )

    def replay(
        self, batch_id: str, events: Sequence[FactCorrection], retry_rung: str | None = None
    ) -> AppliedUnit:
        """Re-apply a journaled unit without the post-check (it passed when first applied),
        with the editor that first applied it.

        Raises:
            RetryLadderChangedError: ``retry_rung`` is not in the configured ladder.
        """
        rung = self.rung_for(retry_rung, batch_id)
        editor = rung.editor if rung is not None else self.editor
        started = time.perf_counter()
        result = editor.apply(self.lm, [to_request(e) for e in events])
        seconds = time.perf_counter() - started
        stage = rung.stage if rung is not None else FIRST
        return AppliedUnit(batch_id, list(events), result, seconds, stage, rung)

    def replay_stored(
        self,
        batch_id: str,
        events: Sequence[FactCorrection],
        deltas: Mapping[str, torch.Tensor],
        retry_rung: str | None = None,
    ) -> AppliedUnit:
        """Re-apply a journaled unit from its stored deltas (``daemon.records.unit_deltas``),
        written as the editor wrote them, so the weights match the first application bit for bit.

        The editor is not called, so an editor that keeps a memory of past edits does not
        learn this unit: the caller rebuilds that memory (``replay_journal`` does).

        Raises:
            RetryLadderChangedError: ``retry_rung`` is not in the configured ladder (as
                ``replay`` does, so a journal that only re-editing could replay never starts).
            EditError: a delta does not fit the model; the weights are unchanged.
        """
        rung = self.rung_for(retry_rung, batch_id)
        started = time.perf_counter()
        stored = dict(deltas)
        previous = write_deltas(self.lm.model, stored)
        seconds = time.perf_counter() - started
        result = EditResult(stored, previous, seconds, {"replayed_from": "stored deltas"})
        stage = rung.stage if rung is not None else FIRST
        return AppliedUnit(batch_id, list(events), result, seconds, stage, rung)

    def _try_unit(
        self,
        events: list[FactCorrection],
        outcome: BatchOutcome,
        *,
        stage: str = FIRST,
        rung: Rung | None = None,
    ) -> _Attempt:
        editor = rung.editor if rung is not None else self.editor
        requests = [to_request(e) for e in events]
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                result = editor.apply(self.lm, requests)
                break
            except EditError as exc:  # the editor guarantees the model is unchanged
                return _Attempt(None, {e.id: f"editor refused: {exc}" for e in events})
            except Exception as exc:
                if self.rebuild is None:
                    raise
                transient = self.retry.is_transient(exc)
                log.exception(
                    "editor failed; rebuilding the weights from the journal",
                    extra={"transient": transient, "attempt": attempt + 1, "stage": stage},
                )
                self._rebuild_keeping(outcome.applied)
                if transient and attempt < self.retry.retries:
                    attempt += 1
                    self.sleep(self.retry.delay(attempt))
                    continue
                note = f" (transient; failed {attempt + 1} times)" if transient else ""
                reason = f"editor error{note}: {type(exc).__name__}: {exc}"[:300]
                return _Attempt(None, {e.id: reason for e in events}, crashed=True)
        failures = self.post_check(requests)
        if failures:
            editor.undo(self.lm, result)
            return _Attempt(None, failures)
        seconds = time.perf_counter() - started
        return _Attempt(AppliedUnit(uuid.uuid4().hex, events, result, seconds, stage, rung), {})

    def _rebuild_keeping(self, kept: list[AppliedUnit]) -> None:
        """Journal state, then the units of this batch kept so far (not journaled yet)."""
        assert self.rebuild is not None
        self.rebuild()
        for i, unit in enumerate(kept):
            replayed = self.replay(unit.batch_id, unit.events, unit.retry_rung)
            kept[i] = AppliedUnit(
                unit.batch_id, unit.events, replayed.result, unit.seconds, unit.stage, unit.rung
            )

    def post_check(self, requests: Sequence[EditRequest]) -> dict[str, str]:
        """Requests whose greedy answer does not start with the new target (``editing.checks``).

        One teacher-forced pass over the batch decides most of them; the rest are decoded.
        """
        verdicts = self.judge.judge([(r.prompt, r.target_new) for r in requests])
        return {
            r.request_id: f"edit did not take: model answers {_answer_text(self.judge, v)!r}"
            for r, v in zip(requests, verdicts, strict=True)
            if not v.ok
        }


def _answer_text(judge: Judge, verdict: Verdict) -> str:
    """The greedy answer as far as the check saw it (decoded, or the forced argmax path)."""
    if verdict.answer is not None:
        return verdict.answer.strip()[:80]
    s = verdict.scored
    k = next(
        (i for i, (a, b) in enumerate(zip(s.answer_ids, s.argmax_ids, strict=True)) if a != b), None
    )
    ids = list(s.answer_ids) if k is None else [*s.answer_ids[:k], s.argmax_ids[k]]
    return (judge.lm.tokenizer.decode(ids).strip() + "...")[:80]
