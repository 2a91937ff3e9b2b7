"""Short measurements: which modules to edit (a sweep), and a quick check of a trained editor.

These are this package's own minimal teacher-forced checks, used before the project's benchmark
harness existed; the benchmark's numbers are the reference. In the sweep, each candidate edits
one batch of requests with *untrained* hypernetworks (identity blocks, so a step is the
normalised gradient direction, aggregated by the ridge solve) at a few step sizes, and is scored
teacher-forced: efficacy and generalisation (token accuracy of the new target on the prompt and on
a rephrase) and locality (agreement of the top-1 token with the unedited model on the locality
probes). Meta-training then refines the step size and the transform; the sweep only says where
edits take with the least collateral change. Results feed ``README.md`` here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from editing.emsedit.config import EMSEditConfig, ModuleGroup
from editing.emsedit.editor import EMSEditEditor
from editing.models import LoadedModel
from editing.requests import EditRequest
from editing.scoring import TeacherForcedScorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRow:
    modules: str
    lr: float
    efficacy: float
    generalization: float
    locality: float
    seconds: float


def _label(groups: Sequence[ModuleGroup]) -> str:
    return "+".join(f"{g.role}{g.layers[0]}-{g.layers[-1]}" for g in groups)


def sweep_modules(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    candidates: Sequence[tuple[ModuleGroup, ...]],
    step_sizes: Sequence[float],
    base: EMSEditConfig | None = None,
) -> list[SweepRow]:
    """Score every (module set, step size) on one batch edit of ``requests``."""
    base = base or EMSEditConfig()
    scorer = TeacherForcedScorer(lm.model, lm.tokenizer, lm.adapter)
    edit = [(r.prompt, r.target_new) for r in requests]
    gen = [(r.rephrases[0] if r.rephrases else r.prompt, r.target_new) for r in requests]
    loc = [(p.prompt, p.answer) for r in requests for p in r.locality[:1]]
    before = scorer.score(loc)
    rows = []
    for groups in candidates:
        for lr in step_sizes:
            config = base.replace(modules=groups, lr_init=lr, update_normalizer_at_edit=True)
            started = time.perf_counter()
            editor = EMSEditEditor.from_config(config)
            result = editor.apply(lm, requests)
            try:
                eff = scorer.score(edit)
                gen_scores = scorer.score(gen)
                after = scorer.score(loc)
            finally:
                editor.undo(lm, result)
            agree = [
                sum(a == b for a, b in zip(x.argmax_ids, y.argmax_ids, strict=True))
                / len(x.argmax_ids)
                for x, y in zip(before, after, strict=True)
            ]
            row = SweepRow(
                modules=_label(groups),
                lr=lr,
                efficacy=sum(s.token_accuracy for s in eff) / len(eff),
                generalization=sum(s.token_accuracy for s in gen_scores) / len(gen_scores),
                locality=sum(agree) / max(len(agree), 1),
                seconds=time.perf_counter() - started,
            )
            log.info("sweep row", extra=row.__dict__)
            rows.append(row)
    return rows


@dataclass(frozen=True)
class SequentialCheck:
    """Teacher-forced token accuracies after all turns, on the final model."""

    n_edits: int
    turn_size: int
    efficacy: float  # new target on the edit prompt
    generalization: float  # new target on the first rephrase
    locality: float  # top-1 agreement with the unedited model on the locality probes
    efficacy_exact: float  # fraction of edits whose every target token is top-1
    seconds_per_edit: float


def check_sequential(
    lm: LoadedModel,
    editor: EMSEditEditor,
    requests: Sequence[EditRequest],
    turn_size: int,
) -> SequentialCheck:
    """Apply ``requests`` in turns of ``turn_size``, score every one on the final model, undo."""
    scorer = TeacherForcedScorer(lm.model, lm.tokenizer, lm.adapter)
    edit = [(r.prompt, r.target_new) for r in requests]
    gen = [(r.rephrases[0] if r.rephrases else r.prompt, r.target_new) for r in requests]
    loc = [(p.prompt, p.answer) for r in requests for p in r.locality[:1]]
    before = scorer.score(loc)
    results = []
    started = time.perf_counter()
    try:
        for start in range(0, len(requests), turn_size):
            results.append(editor.apply(lm, requests[start : start + turn_size]))
            log.info("check turn", extra={"edits": start + turn_size})
        seconds = time.perf_counter() - started
        eff = scorer.score(edit)
        gen_scores = scorer.score(gen)
        after = scorer.score(loc)
    finally:
        for result in reversed(results):
            editor.undo(lm, result)
    agree = [
        sum(a == b for a, b in zip(x.argmax_ids, y.argmax_ids, strict=True)) / len(x.argmax_ids)
        for x, y in zip(before, after, strict=True)
    ]
    return SequentialCheck(
        n_edits=len(requests),
        turn_size=turn_size,
        efficacy=sum(s.token_accuracy for s in eff) / len(eff),
        generalization=sum(s.token_accuracy for s in gen_scores) / len(gen_scores),
        locality=sum(agree) / max(len(agree), 1),
        efficacy_exact=sum(s.all_correct for s in eff) / len(eff),
        seconds_per_edit=seconds / len(requests),
    )
