"""What one fact correction asks of an editor, independent of where it came from.

Datasets (ZsRE, CounterFact, MQuAKE) and the daemon's Kafka events both become ``EditRequest``s,
so editors, metrics and audits see one type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ProbeKind = Literal["neighbourhood", "same_subject", "unrelated"]
PROBE_KINDS: tuple[str, ...] = ("neighbourhood", "same_subject", "unrelated")


@dataclass(frozen=True)
class LocalityProbe:
    """A prompt whose answer must not change when the fact is edited.

    ``kind`` says how close it sits to the edit, because the metrics report each apart:
    ``neighbourhood`` (another subject with the edited fact's relation and true object: the
    hardest case, CounterFact's neighbourhood prompts), ``same_subject`` (the edited subject
    with another relation, KnowEdit ZsRE's probes) and ``unrelated`` (other knowledge, such as
    ZsRE's Natural Questions items).
    """

    prompt: str
    answer: str
    kind: ProbeKind = "neighbourhood"

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"LocalityProbe.kind must be one of {', '.join(PROBE_KINDS)}")


@dataclass(frozen=True)
class MultiHopQuestion:
    """A question whose answer follows from several edited facts (MQuAKE)."""

    question: str
    answer: str
    answer_aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditRequest:
    """Make the model continue ``prompt`` with ``target_new``.

    Targets are stored as people write them ("Paris"); ``continuation`` gives the exact text the
    model should produce after the prompt (" Paris"), the one place that convention lives.
    """

    request_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrases: tuple[str, ...] = ()
    """Real paraphrases of ``prompt`` (never generation prompts: those go in ``extra``)."""
    locality: tuple[LocalityProbe, ...] = ()
    multi_hop: tuple[MultiHopQuestion, ...] = ()
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.target_new.strip():
            raise ValueError(f"{self.request_id}: target_new is empty")
        if self.subject and self.subject not in self.prompt:
            raise ValueError(f"{self.request_id}: subject {self.subject!r} not in prompt")


def continuation(target: str) -> str:
    """The text that follows a prompt for ``target``: separated by one space, as in the datasets."""
    return target if target.startswith((" ", "\n")) else " " + target
