"""Turning validated events into model edits that either take completely or not at all.

A batch is applied with the configured editor, then every edit is post-checked: the model's
greedy answer to the prompt must now start with the new target. If any edit in a batch does not
take, the whole batch is undone (bit-exact) and its events are applied one at a time, so one bad
correction cannot drag good ones down; an event that still does not take alone is undone and
reported as failed. The units that were finally kept are what the journal records (``batch_id``)
and what replay re-applies, in order, to reach the same weights after a restart.

An editor that fails with a *transient* error (``TransientRetry``: out of memory by default) is
retried a bounded number of times with a doubling backoff, the weights rebuilt from the journal
before each try; only then are its events failed. Other unexpected errors fail them at once.

A correction for a prompt an earlier edit already changed is applied on top of it (the earlier
edit stays in the weights and in the journal); audits expect the newest target for each prompt.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemon.config import EditorSettings
from daemon.events import FactCorrection
from editing.checks import Judge, Verdict
from editing.editors.base import EditError, Editor, EditResult
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


@dataclass
class AppliedUnit:
    """Events applied together in one editor call and kept: the unit of replay."""

    batch_id: str
    events: list[FactCorrection]
    result: EditResult
    seconds: float


@dataclass
class BatchOutcome:
    applied: list[AppliedUnit] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # event id -> reason

    @property
    def applied_ids(self) -> list[str]:
        return [e.id for unit in self.applied for e in unit.events]


class EditApplier:
    """Applies events to one loaded model with one editor.

    ``rebuild`` makes the weights what the journal says (the daemon passes its restore + replay).
    With it, an editor that fails in an unexpected way (not ``EditError``, so the weights may be
    half-written) costs a rebuild and marks the events failed instead of crashing the daemon on
    the same record after every restart; without it, the error propagates. A transient error
    (``retry``) is retried after the rebuild, up to ``retry.retries`` times.
    """

    def __init__(
        self,
        lm: LoadedModel,
        editor: Editor,
        rebuild: Callable[[], None] | None = None,
        retry: TransientRetry | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.lm = lm
        self.editor = editor
        self.rebuild = rebuild
        self.judge = Judge(lm)
        self.retry = retry or TransientRetry()
        self.sleep = sleep

    def apply(self, events: Sequence[FactCorrection]) -> BatchOutcome:
        """Apply ``events``; every event ends up in ``applied`` or ``failed``, never half-done."""
        outcome = BatchOutcome()
        if not events:
            return outcome
        if len(events) > 1 and self.editor.supports_batch:
            unit, failures = self._try_unit(list(events), outcome)
            if unit is not None:
                outcome.applied.append(unit)
                return outcome
            log.info("batch did not fully take; retrying one at a time", extra={"n": len(events)})
        for event in events:
            unit, failures = self._try_unit([event], outcome)
            if unit is not None:
                outcome.applied.append(unit)
            else:
                outcome.failed[event.id] = failures.get(event.id, "edit did not take")
        return outcome

    def replay(self, batch_id: str, events: Sequence[FactCorrection]) -> AppliedUnit:
        """Re-apply a journaled unit without the post-check (it passed when first applied)."""
        started = time.perf_counter()
        result = self.editor.apply(self.lm, [to_request(e) for e in events])
        return AppliedUnit(batch_id, list(events), result, time.perf_counter() - started)

    def _try_unit(
        self, events: list[FactCorrection], outcome: BatchOutcome
    ) -> tuple[AppliedUnit | None, dict[str, str]]:
        requests = [to_request(e) for e in events]
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                result = self.editor.apply(self.lm, requests)
                break
            except EditError as exc:  # the editor guarantees the model is unchanged
                return None, {e.id: f"editor refused: {exc}" for e in events}
            except Exception as exc:
                if self.rebuild is None:
                    raise
                transient = self.retry.is_transient(exc)
                log.exception(
                    "editor failed; rebuilding the weights from the journal",
                    extra={"transient": transient, "attempt": attempt + 1},
                )
                self._rebuild_keeping(outcome.applied)
                if transient and attempt < self.retry.retries:
                    attempt += 1
                    self.sleep(self.retry.delay(attempt))
                    continue
                note = f" (transient; failed {attempt + 1} times)" if transient else ""
                reason = f"editor error{note}: {type(exc).__name__}: {exc}"[:300]
                return None, {e.id: reason for e in events}
        failures = self.post_check(requests)
        if failures:
            self.editor.undo(self.lm, result)
            return None, failures
        unit = AppliedUnit(uuid.uuid4().hex, events, result, time.perf_counter() - started)
        return unit, {}

    def _rebuild_keeping(self, kept: list[AppliedUnit]) -> None:
        """Journal state, then the units of this batch kept so far (not journaled yet)."""
        assert self.rebuild is not None
        self.rebuild()
        for i, unit in enumerate(kept):
            kept[i] = AppliedUnit(
                unit.batch_id,
                unit.events,
                self.replay(unit.batch_id, unit.events).result,
                unit.seconds,
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
