"""Valid events for the daemon tests, built through the real parser."""

from __future__ import annotations

import json
from typing import Any

from daemon.ingest.events import FactCorrection, parse_event


def event_dict(event_id: str = "cf:1", **overrides: Any) -> dict[str, Any]:
    """A valid fact-correction/v1 object (CounterFact's first record), with overrides."""
    base: dict[str, Any] = {
        "schema": "fact-correction/v1",
        "id": event_id,
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "target_old": "French",
        "rephrases": ["Danielle Darrieux, a native speaker of"],
        "locality_probes": [{"prompt": "The capital of France is", "answer": "Paris"}],
        "source": "counterfact",
        "created_at": "2026-05-01T12:00:00Z",
    }
    return {**base, **overrides}


def to_bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


def make_event(event_id: str = "cf:1", **overrides: Any) -> FactCorrection:
    return parse_event(to_bytes(event_dict(event_id, **overrides)))
