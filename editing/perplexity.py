"""Perplexity of a fixed text sample: the drift figure the audits and the benchmark share.

Each line is split into its first word (context) and the rest (predicted), scored teacher-forced
with ``editing.scoring``, and the perplexity is token-weighted over all predicted tokens. The base
and the edited model are measured on the same tokens, so a small sample (a few thousand tokens)
is enough for the relative drift ``current / base - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from editing.errors import FactkeeperError
from editing.scoring import Pair, Scored

LINE_CHARS = 500
"""Lines are cut at a space to at most this many characters."""


class TextSampleError(FactkeeperError):
    """The text sample cannot be read or holds nothing to predict."""


def read_text_lines(
    raw: Sequence[str], budget_chars: int, *, skip_headings: bool = False
) -> list[str]:
    """The first lines of ``raw`` (whitespace collapsed, two words or more) up to a budget.

    Args:
        raw: candidate lines, in order.
        budget_chars: stop once this many characters are taken.
        skip_headings: drop WikiText's ``= Heading =`` lines.
    """
    lines: list[str] = []
    total = 0
    for line in raw:
        line = " ".join(line.split())
        if skip_headings and line.startswith("=") and line.endswith("="):
            continue
        if len(line) > LINE_CHARS:
            line = line[:LINE_CHARS].rsplit(" ", 1)[0]
        if " " in line:
            lines.append(line)
            total += len(line)
        if total >= budget_chars:
            break
    return lines


def read_text_file(path: Path, budget_chars: int) -> list[str]:
    """``read_text_lines`` of a plain-text file (WikiText headings skipped)."""
    try:
        raw = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TextSampleError(f"cannot read the text sample {path}: {exc}") from None
    lines = read_text_lines(raw, budget_chars, skip_headings=True)
    if not lines:
        raise TextSampleError(f"the text sample {path} has no line of two or more words")
    return lines


def text_pairs(lines: Sequence[str]) -> list[Pair]:
    """Each line as (first word, rest): the rest is what the perplexity is measured on."""
    pairs = []
    for line in lines:
        head, _, rest = line.strip().partition(" ")
        if not rest.strip():
            raise TextSampleError(
                f"text sample line {line[:40]!r} has one word; nothing to predict"
            )
        pairs.append((head, rest.strip()))
    return pairs


def perplexity(scored: Sequence[Scored]) -> tuple[float, int]:
    """Token-weighted perplexity of scored continuations, and the number of tokens."""
    tokens = sum(len(s.logprobs) for s in scored)
    if tokens == 0:
        raise TextSampleError("the perplexity text sample has no tokens to predict")
    nll = -sum(sum(s.logprobs) for s in scored)
    return math.exp(nll / tokens), tokens
