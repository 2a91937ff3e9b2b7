"""Which correction of a fact is live: the newest one, and none after a restoring correction.

Corrections of one fact replace each other, but every applied one stays in the weights' history
(replay, rollback and a version's event ids all count it), so the journal keeps their status
``applied`` and records the replacement in ``superseded_by`` instead. The *live set* (the
applied rows whose ``superseded_by`` is NULL) holds at most one correction per fact: what the
audits check and what a consolidation re-solves.

Fact identity (``fact_key``): events carry no relation, so a fact is its subject plus its prompt
as a reader would compare them: the subject exactly as validated (NFC, stripped), and the prompt
in NFC, case-folded, its whitespace runs collapsed to one space and trailing punctuation and
spaces dropped. "The capital of X is" and "the capital of  X is:" are one fact; "The capital of X
was" is another, and so is the same prompt about another subject string.

Links (``links``): within one fact, each applied row is superseded by the next newer applied
row, and the newest is live. A row that restores the original answer (``daemon.ingest.restores``)
holds no edit of its own and points at itself: it is never live, and the rows before it are
superseded, their edits reverted.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from daemon.ingest.events import FactCorrection

#: Between the subject and the prompt in a key: a control character no event text may hold.
_SEPARATOR = "\x1f"


def normalise_prompt(prompt: str) -> str:
    """The prompt as ``fact_key`` compares it (NFC, case-folded, spaces collapsed, no trailing
    punctuation or space)."""
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", prompt).casefold())
    text = " ".join(text.split())
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1])[0] == "P"):
        end -= 1
    return text[:end]


def fact_key(event: FactCorrection) -> str:
    """Which fact ``event`` corrects: its subject plus its normalised prompt (module docstring)."""
    return f"{event.subject}{_SEPARATOR}{normalise_prompt(event.prompt)}"


def links(rows: Sequence[tuple[str, bool]]) -> dict[str, str | None]:
    """``superseded_by`` of one fact's applied rows, given as ``(event_id, restores_original)``
    in journal order: the next newer row's id, the row's own id for a restoring row, and None
    (live) for the newest row when it holds an edit."""
    linked: dict[str, str | None] = {}
    newer: str | None = None
    for event_id, restores in reversed(rows):
        linked[event_id] = event_id if restores else newer
        newer = event_id
    return linked
