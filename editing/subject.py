"""Where a request's subject is in its tokenised prompt: where subject-token keys are read.

Locate-then-edit methods (NSE, MEMIT) and EMSEdit with ``key_position: subject`` read an MLP
matrix's input at the subject's last token, where the model recalls facts about the subject.
"""

from __future__ import annotations

from dataclasses import dataclass

from editing.editors.base import EditError
from editing.models import LoadedModel


@dataclass(frozen=True)
class EncodedText:
    """One tokenised text and the positions of its subject's last and first tokens."""

    ids: list[int]
    subject_index: int
    subject_first: int = -1


def encode_with_subject(
    lm: LoadedModel, text: str, subject_start: int, subject_end: int
) -> EncodedText:
    """Tokenise ``text``; find the tokens overlapping ``text[subject_start:subject_end]``."""
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    overlapping = [
        i
        for i, (start, end) in enumerate(enc.offset_mapping)
        if end > start and start < subject_end and end > subject_start
    ]
    if not overlapping:
        raise EditError(f"subject {text[subject_start:subject_end]!r} has no token in {text!r}")
    return EncodedText(list(enc.input_ids), overlapping[-1], overlapping[0])


def encode_prompt(lm: LoadedModel, template: str, prompt: str, subject: str) -> EncodedText:
    """``template`` with the prompt in place of "{}", and the subject's last token in it."""
    at = prompt.find(subject) if subject else -1
    if at < 0:
        raise EditError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    head = template.split("{}")[0]
    text = template.replace("{}", prompt)
    offset = len(head) + at
    return encode_with_subject(lm, text, offset, offset + len(subject))
