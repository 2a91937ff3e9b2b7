"""The audit gate: whether a version may become ``production``, with reasons a person can act on.

Floors are absolute (retention and locality must stay above them whatever happened before);
``max_drop`` compares retention, locality and generalisation with the last audit that passed,
so a slow slide is caught before it reaches a floor; ``max_perplexity_drift`` bounds how far the
perplexity on the text sample may rise above the base model's. A figure that does not apply
(no edits yet, no rephrases) is not judged. Deciding is pure: rolling back, quarantining and
alerting are the daemon's job.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitoring.audit_report import AuditReport


# Ratios are means over finitely many items; a drop of exactly ``max_drop`` must pass even when
# the subtraction lands a few ulps above it (0.95 - 0.90 = 0.05000000000000004).
_EPSILON = 1e-9


@dataclass(frozen=True)
class GateThresholds:
    """What an audit must show for its version to be promoted.

    The daemon's ``audit`` settings section holds one, its fields written flat in the section,
    so each threshold is declared, defaulted and checked here only.
    """

    retention_floor: float = 0.8
    """Lowest acceptable share of audited edits that still hold (generation exact match)."""
    locality_floor: float = 0.9
    """Lowest acceptable share of probes whose greedy answer is still the base model's."""
    max_drop: float = 0.05
    """Largest acceptable fall of retention, locality or generalisation since the last pass."""
    max_perplexity_drift: float = 0.1
    """Largest acceptable relative rise of perplexity over the base model (0.1 = +10 %)."""

    def __post_init__(self) -> None:
        for name in ("retention_floor", "locality_floor", "max_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GateThresholds.{name} must be in [0, 1], got {value}")
        drift = self.max_perplexity_drift
        if not (drift >= 0.0 and math.isfinite(drift)):
            raise ValueError(f"GateThresholds.max_perplexity_drift must be >= 0, got {drift}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateThresholds:
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass(frozen=True)
class GateDecision:
    """The verdict; ``reasons`` is empty exactly when the gate passed."""

    passed: bool
    reasons: tuple[str, ...] = ()


def evaluate_gate(
    result: AuditReport, thresholds: GateThresholds, previous: AuditReport | None
) -> GateDecision:
    """Judge one audit against the thresholds and the last audit that passed.

    Args:
        result: the audit of the version under judgement.
        thresholds: floors and allowed changes.
        previous: the last audit whose gate passed (the ``production`` version's), or None
            before the first; only then are drops not checked.

    Returns:
        The decision, with one sentence per violated rule, naming the figures.
    """
    reasons: list[str] = []
    retention = result.retention.exact_match
    if retention is not None and retention < thresholds.retention_floor - _EPSILON:
        held = round(retention * result.edits_audited)
        reasons.append(
            f"retention {retention:.3f} is below the floor {thresholds.retention_floor:.3f} "
            f"({held} of {result.edits_audited} audited edits still hold)"
        )
    agreement = result.locality.agreement
    if agreement is not None and agreement < thresholds.locality_floor - _EPSILON:
        kept = round(agreement * result.locality.n)
        reasons.append(
            f"locality {agreement:.3f} is below the floor {thresholds.locality_floor:.3f} "
            f"({kept} of {result.locality.n} probes keep the base model's answer)"
        )
    drift = result.perplexity.drift
    if drift > thresholds.max_perplexity_drift + _EPSILON:
        reasons.append(
            f"perplexity on the text sample rose {drift:+.1%} over the base model "
            f"({result.perplexity.base:.3f} -> {result.perplexity.current:.3f}), "
            f"more than the allowed {thresholds.max_perplexity_drift:.1%}"
        )
    if previous is not None:
        for label, now, before in (
            ("retention", retention, previous.retention.exact_match),
            ("locality", agreement, previous.locality.agreement),
            (
                "generalisation",
                result.generalisation.exact_match,
                previous.generalisation.exact_match,
            ),
        ):
            if now is None or before is None:
                continue
            if before - now > thresholds.max_drop + _EPSILON:
                reasons.append(
                    f"{label} fell by {before - now:.3f} since the last audit that passed "
                    f"({before:.3f} -> {now:.3f}), more than the allowed {thresholds.max_drop:.3f}"
                )
    return GateDecision(passed=not reasons, reasons=tuple(reasons))


__all__ = ["GateDecision", "GateThresholds", "evaluate_gate"]
