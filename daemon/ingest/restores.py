"""Which corrections put their fact's original answer back, and so need no edit of their own.

A fact corrected from "French" to "English" and then to "German" is restored when a correction
says "French" again: rather than a third edit on top of two, the two edits are reverted
(``History.remove_restored``) and the correction is journaled as applied without one.

The original answer is the ``target_old`` of the oldest correction in the fact's chain
(``Journal.fact_chain``, plus corrections earlier in the same batch); without one, or without a
chain, nothing is restored and the correction is edited as usual. A correction restores it when
its ``target_new`` is the same answer under the one judge (``editing.checks.answer_matches``,
both ways: NFC, surrounding whitespace ignored, case and the whole text compared), so "French"
restores " French" but neither "french" nor "French Creole".
"""

from __future__ import annotations

from collections.abc import Sequence

from daemon.ingest.events import FactCorrection
from editing.checks import answer_matches

#: The journal row's reason for a correction that restored its fact's original answer.
RESTORES_REASON = "restores the original answer; the fact's earlier edits are reverted"


def same_answer(first: str, second: str) -> bool:
    """Whether two answers are the same text to the judge (each one answers the other)."""
    return answer_matches(first, second) and answer_matches(second, first)


def restores_original(event: FactCorrection, chain: Sequence[FactCorrection]) -> bool:
    """Whether ``event`` puts back the original answer of the fact ``chain`` corrected (the
    fact's applied corrections since it was last restored, oldest first)."""
    original = chain[0].target_old if chain else None
    return original is not None and same_answer(event.target_new, original)
