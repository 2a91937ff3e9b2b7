"""Synthetic neighbours of an edit: other subjects in the same prompt, kept unchanged by the solve.

Measured on SmolLM2 (one NSE batch of 20 CounterFact val edits, ``bench/nse_leaks.py``): most
unrelated answers that flip do so through keys that resemble the edit's key without being the
edited fact. Editing "Howard Glacier is located in" → Europe moved every "<name> Glacier" prompt,
through the key at the shared last token " Glacier"; smaller shifts at other subjects' tokens in
prompts of the same relation flip answers that were near a tie. λ·C0 cannot stop either: C0 is an
average over ordinary text, where such tokens are rare.

A decoy is the request's prompt with its subject replaced, in two ways:

* **same head**: the words before the subject's last word swapped for another name ("Tanner
  Glacier is located in"), so the edit must use what tells "Howard" apart, not " Glacier";
* **other subject**: the whole subject swapped ("Moreno is located in"), so the relation's
  prompt alone does not trigger the edit.

Names are capitalised words of the key-statistics corpus (ordinary text, no evaluation data),
drawn by a generator seeded with the request's content, so an edit stays a pure function of
(weights, request, config) as replay needs. The solve then asks ΔW k_decoy ≈ 0 with weight
``decoy_weight`` per decoy key, beside λ·C0 and the past-edit memory.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from editing.keystats import DEFAULT_CORPUS
from editing.requests import EditRequest

_NAME = re.compile(r"(?<![\w-])([A-Z][a-z]{2,11})(?![\w-])")
_MIN_COUNT = 3
_MAX_NAMES = 4000


@lru_cache(maxsize=4)
def corpus_names(corpus: Path = DEFAULT_CORPUS) -> tuple[str, ...]:
    """Capitalised words seen at least ``_MIN_COUNT`` times mid-sentence, most frequent first.

    A word right after a full stop is skipped when counting, so sentence-initial function words
    ("The", "This") are not mistaken for names.
    """
    counts: Counter[str] = Counter()
    for line in corpus.read_text(encoding="utf-8").splitlines():
        for match in _NAME.finditer(line):
            before = line[: match.start()].rstrip()
            if before and not before.endswith((".", "=", '"', "@")):
                counts[match.group(1)] += 1
    ranked = [w for w, c in counts.most_common() if c >= _MIN_COUNT]
    return tuple(ranked[:_MAX_NAMES])


def _rng(request: EditRequest) -> random.Random:
    seed = hashlib.sha256(f"{request.prompt}\x00{request.subject}".encode()).digest()
    return random.Random(int.from_bytes(seed[:8], "big"))


def decoys_for(
    request: EditRequest, count: int, names: Sequence[str] | None = None
) -> list[EditRequest]:
    """``count`` decoy prompts of ``request`` (half same head where the subject has one)."""
    if count <= 0 or not request.subject:
        return []
    names = names if names is not None else corpus_names()
    rng = _rng(request)
    words = request.subject.split()
    head = words[-1] if len(words) > 1 else None
    subject_words = set(words)
    out: list[EditRequest] = []
    for i in range(count):
        name = rng.choice(names)
        while name in subject_words:
            name = rng.choice(names)
        decoy = f"{name} {head}" if head is not None and i % 2 == 0 else name
        prompt = request.prompt.replace(request.subject, decoy, 1)
        out.append(
            replace(
                request,
                request_id=f"{request.request_id}~decoy{i}",
                prompt=prompt,
                subject=decoy,
                rephrases=(),
                locality=(),
                multi_hop=(),
            )
        )
    return out
