"""The fact memory's knobs in one frozen dataclass (no torch import: cheap to read and check)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from editing.configfile import ConfigError


@dataclass(frozen=True)
class MemoryConfig:
    """Where the memory reads its keys and writes its values, and how sharply it gates.

    The defaults come from ``bench/memory_gate.py`` on validation data
    (``bench/results/memory-gate.json``): at the subject's last token, the input of layer 4's
    down-projection, averaged over NSE's prefix templates, tells an edited subject apart from
    every position of wiki text and of other subjects' prompts at cosine 0.85, while the
    subject's paraphrases still reach it.
    """

    key_layer: int = 4
    """Block whose MLP down-projection input is the key (the MLP's neuron activations)."""
    value_layer: int = 7
    """Block whose output receives the value: NSE's z layer, which the value network knows."""
    threshold: float = 0.85
    """Cosine between a position's key and a row's key at or above which the row fires."""
    threshold_floor: float = 0.75
    """A row whose own prompt's key falls short of ``threshold`` gets that cosine (less 0.01)
    as its threshold, down to this floor, so the edit takes at the prompt it was asked for;
    below the floor the row keeps ``threshold``."""
    lead_threshold: float = 0.5
    """A subject of several tokens also gates on its first token (the lead key): the position
    as many tokens back must reach this cosine (or the edit prompt's own, less 0.01), so
    another name that ends in the same word does not fire the row. Different words' keys are
    far apart, while the same word's key moves with its context: at 0.5, ZsRE train rephrases
    reach 92 % of rows (the last token alone: 92-95 %), at the 0.85 rule only 58-61 %, and the
    wiki text that "Kelly Boulter"'s row fired on 14 times stays quiet. 0 turns leads off."""
    capacity: int = 4096
    """Rows; an edit needs one per request, and a full memory refuses edits."""

    def __post_init__(self) -> None:
        checks = [
            (self.key_layer >= 0, "key_layer must be >= 0"),
            (self.value_layer >= self.key_layer, "value_layer must be >= key_layer"),
            (0.0 < self.threshold <= 1.0, "threshold must be in (0, 1]"),
            (0.0 < self.threshold_floor <= self.threshold, "need 0 < threshold_floor <= threshold"),
            (0.0 <= self.lead_threshold <= 1.0, "lead_threshold must be in [0, 1]"),
            (self.capacity >= 1, "capacity must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"MemoryConfig: {message}")

    def replace(self, **changes: Any) -> MemoryConfig:
        return dataclasses.replace(self, **changes)
