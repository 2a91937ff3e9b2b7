"""The audit's figures and the statistics behind them.

Each figure is a share of per-item outcomes (a fact holds, a probe keeps its answer) or a ratio
of perplexities; the classmethods ``of`` compute them, so the auditor only collects outcomes.
Retention carries a Wilson interval, because a sampled audit checks only some of the facts, and
the sample is stratified by edit age so that early edits stay represented.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95 % standard normal quantile
AGE_STRATA = 10
"""A sampled audit splits the facts, oldest to newest, into this many strata of equal size."""


def mean_or_none(values: Iterable[float]) -> float | None:
    """The mean, or None for no values: a figure that does not apply is not judged."""
    values = list(values)
    return sum(values) / len(values) if values else None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sensible at 0 and 1, unlike the normal one."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def stratified_sample(n: int, cap: int, seed: int, strata: int = AGE_STRATA) -> list[int]:
    """Indices of the facts to audit, sorted; all of them when ``n <= cap``.

    Facts are listed oldest first, so contiguous strata are age bands: each gets a share of
    ``cap`` proportional to its size (largest remainder), drawn with ``random.Random(seed)``,
    and early edits stay represented however many later ones arrive.
    """
    if cap < 1:
        raise ValueError("cap must be >= 1")
    if n <= cap:
        return list(range(n))
    k = min(strata, cap)
    bounds = [n * i // k for i in range(k + 1)]
    sizes = [bounds[i + 1] - bounds[i] for i in range(k)]
    exact = [size * cap / n for size in sizes]
    quotas = [math.floor(x) for x in exact]
    by_remainder = sorted(range(k), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: cap - sum(quotas)]:
        quotas[i] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for i in range(k):
        chosen += rng.sample(range(bounds[i], bounds[i + 1]), quotas[i])
    return sorted(chosen)


@dataclass(frozen=True)
class RetentionFigures:
    """Do the applied edits still hold (the audited ones, when sampled)?"""

    exact_match: float | None
    """Share of audited facts whose greedy answer still passes; None with no facts."""
    token_accuracy: float | None
    """Mean teacher-forced token accuracy of the targets."""
    ci95: tuple[float, float] | None
    """Wilson 95 % interval of ``exact_match`` over the audited facts."""

    @classmethod
    def of(cls, held: Sequence[bool], token_accuracies: Iterable[float]) -> RetentionFigures:
        """From whether each audited fact still holds and its target's token accuracy."""
        return cls(
            exact_match=mean_or_none(held),
            token_accuracy=mean_or_none(token_accuracies),
            ci95=wilson_interval(sum(held), len(held)) if held else None,
        )


@dataclass(frozen=True)
class GeneralisationFigures:
    """Do the edits carry over to their rephrases?"""

    exact_match: float | None
    """Share of rephrase prompts answered with the target; None when no fact has rephrases."""
    n: int

    @classmethod
    def of(cls, passed: Sequence[bool]) -> GeneralisationFigures:
        """From whether each checked rephrase is answered with its fact's target."""
        return cls(mean_or_none(passed), len(passed))


@dataclass(frozen=True)
class LocalityFigures:
    """Does the rest of the model still answer as the base model did?"""

    agreement: float
    """Share of probes whose greedy answer equals the base model's."""
    gold_accuracy: float
    """Share of probes whose greedy answer passes the judge for the probe's answer."""
    n: int

    @classmethod
    def of(cls, kept: Sequence[bool], gold_passed: Sequence[bool]) -> LocalityFigures:
        """From, per probe, whether it kept the base answer and whether it passes its own."""
        n = len(kept)
        if n < 1 or len(gold_passed) != n:
            raise ValueError(
                f"need one outcome of each kind per probe, got {n} and {len(gold_passed)}"
            )
        return cls(agreement=sum(kept) / n, gold_accuracy=sum(gold_passed) / n, n=n)


@dataclass(frozen=True)
class PerplexityFigures:
    """Has the model's language modelling drifted from the base model's?"""

    base: float
    current: float
    drift: float
    """``current / base - 1``."""

    @classmethod
    def of(cls, base: float, current: float) -> PerplexityFigures:
        return cls(base=base, current=current, drift=current / base - 1.0)


__all__ = [
    "AGE_STRATA",
    "Z95",
    "GeneralisationFigures",
    "LocalityFigures",
    "PerplexityFigures",
    "RetentionFigures",
    "mean_or_none",
    "stratified_sample",
    "wilson_interval",
]
