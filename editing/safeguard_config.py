"""Which safeguards run around an editor's delta, and their thresholds (``editing.safeguards``).

Kept apart from the safeguards themselves, which need torch, so that the daemon's settings can
hold a ``SafeguardConfig`` and check it when they load, with no torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from editing.errors import EditError

MIN_STATS_TOKENS = 4096
"""The fewest corpus tokens ``KeyStatistics`` takes at its default chunking (2 x 8 x 256)."""

GUARDS = ("rewind", "mask", "preserve", "normguard")
"""The single safeguards: their switches in ``SafeguardConfig`` and the daemon's settings, and
their names in method specs (``emsedit+mask``)."""


@dataclass(frozen=True)
class SafeguardConfig:
    """Which safeguards run and their thresholds; the defaults are the SmolLM2 settings."""

    rewind: bool = True
    """Original-weight targets (S3): compute the editor's inputs against the original weights,
    so drift does not compound."""
    mask: bool = True
    """Neuron mask (S1): keep the delta only on the neurons the edit's keys activate most."""
    mask_p: float = 0.9
    """Cumulative activation mass of the neurons kept (NSE ships 0.8; on SmolLM2's up_proj 0.8
    left about half of EMSEdit's intended change undone, 0.9 about a third)."""
    preserve: bool = True
    """Preserved knowledge (S2): refit the delta to leave preserved keys (C0, earlier edits)
    unchanged."""
    preserve_lambda: float = 50.0
    """Weight of the per-token C0 in the refit, in units of edit-key tokens."""
    preserve_ridge: float = 0.01
    """Ridge of the refit, as a share of λ·C0's mean eigenvalue: C0 of a normalised residual
    stream is nearly singular in a few directions, and without it the refit puts huge weights
    there (measured: ||ΔW|| up to 1.8 ||W0|| on SmolLM2's up_proj)."""
    remember_edits: bool = True
    """Add each applied edit's keys to M, so later refits also keep earlier edits."""
    normguard: bool = True
    """Norm guard (S6): refuse an update whose relative norm exceeds ``max_delta_norm``, or that
    the other safeguards weaken by more than ``max_unexplained``."""
    max_delta_norm: float = 0.1
    """Largest ||ΔW||_F / ||W0||_F per matrix and batch."""
    max_unexplained: float = 0.6
    """Largest ||ΔW U − R|| / ||R|| the mask and refit may leave (checked by the norm guard);
    whether an accepted edit took is the daemon's post-check."""
    stats_tokens: int = 65_536
    """Corpus tokens for C0 (the cache key includes it)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_p <= 1.0:
            raise EditError(f"safeguards: mask_p must be in (0, 1], got {self.mask_p}")
        if self.preserve_lambda < 0 or self.max_delta_norm <= 0 or self.max_unexplained <= 0:
            raise EditError(
                "safeguards: preserve_lambda >= 0, max_delta_norm and max_unexplained > 0"
            )
        if self.stats_tokens < MIN_STATS_TOKENS:
            raise EditError(
                f"safeguards: stats_tokens must be >= {MIN_STATS_TOKENS}, got {self.stats_tokens}"
            )

    @classmethod
    def only(cls, guards: Sequence[str], **overrides: Any) -> SafeguardConfig:
        """A config with exactly the named safeguards on (``GUARDS``; ``safeguards`` = all)."""
        names = set(GUARDS) if "safeguards" in guards else set(guards)
        unknown = names - set(GUARDS)
        if unknown:
            raise EditError(f"unknown safeguard {sorted(unknown)}; known: {', '.join(GUARDS)}")
        flags = {guard: guard in names for guard in GUARDS}
        return cls(**{**flags, "remember_edits": "preserve" in names, **overrides})
