"""Sending corrections to the topic: JSONL files as they are, or dataset records as events.

For demos and tests. Records are keyed by the fact's prompt so that corrections of one fact stay
ordered within one partition.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from daemon.config import KafkaSettings
from daemon.ingest.events import SCHEMA_V1, FactCorrection, encode_event, parse_event
from daemon.kafka.clients import build_producer
from editing.requests import EditRequest

MAX_PROBES = 10


def event_from_request(request: EditRequest, source: str, created_at: datetime) -> FactCorrection:
    """A fact-correction/v1 event carrying a dataset record (rephrases and locality probes too)."""
    payload = {
        "schema": SCHEMA_V1,
        "id": request.request_id,
        "subject": request.subject,
        "prompt": request.prompt,
        "target_new": request.target_new,
        "rephrases": list(request.rephrases[:MAX_PROBES]),
        "locality_probes": [
            {"prompt": p.prompt, "answer": p.answer} for p in request.locality[:MAX_PROBES]
        ],
        "source": source,
        "created_at": created_at.isoformat(),
    }
    if request.target_true and request.target_true.strip() != request.target_new.strip():
        payload["target_old"] = request.target_true
    return parse_event(json.dumps(payload).encode("utf-8"))  # exactly the daemon's validation


def events_from_requests(requests: Sequence[EditRequest], source: str) -> list[bytes]:
    now = datetime.now(UTC)
    return [encode_event(event_from_request(r, source, now)) for r in requests]


def read_jsonl(path: Path) -> Iterator[bytes]:
    """Each non-empty line as raw bytes: the daemon, not the producer, validates them."""
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield line.rstrip(b"\r\n")


def record_key(payload: bytes) -> bytes | None:
    try:
        prompt = json.loads(payload).get("prompt")
    except (ValueError, AttributeError):
        return None
    return prompt.encode("utf-8") if isinstance(prompt, str) else None


def send(kafka: KafkaSettings, payloads: Iterable[bytes], topic: str | None = None) -> int:
    """Send every payload and wait until the broker acknowledged all of them."""
    producer = build_producer(kafka)
    count = 0
    try:
        for payload in payloads:
            producer.send(topic or kafka.topics.corrections, value=payload, key=record_key(payload))
            count += 1
        producer.flush()
    finally:
        producer.close()
    return count
