"""Poison and fuzz: malformed records interleaved with valid ones, through a real daemon.

The stream comes from ``malformed.fuzz_stream`` (deterministic for a seed; see that module for
how it is drawn). One ``factkeeper run`` child consumes it and exits after being idle, and then:

* every malformed record is in the DLQ exactly where it came from (source offset header), with
  its original bytes and a reason header equal to the reason it was built to trigger, and its
  journal row says ``invalid`` (or ``duplicate`` with ``conflicting-duplicate``);
* every valid record reached the editor exactly once: its journal row is ``applied``, or
  ``failed`` with an ``edit-failed`` DLQ record (an FT-L edit of the 32-wide test model does not
  always take; that is the editor's verdict, not a parsing one), and the stored payload is the
  parsed event, hostile-looking text included;
* the daemon consumed every record and exited 0 (no crash), and nothing else reached the DLQ.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from daemon.ingest.events import (
    HEADER_DETAIL,
    HEADER_REASON,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    encode_event,
    parse_event,
)
from tests.daemon.harness import (
    config_file,
    create_topics,
    dlq_records,
    env_for,
    journal_path,
)
from tests.reliability.daemon_process import DaemonProcess
from tests.reliability.malformed import StreamItem, fuzz_stream
from tests.reliability.observe import JournalRow, JournalView

_REQUIRED_HEADERS = (
    HEADER_REASON,
    HEADER_DETAIL,
    HEADER_SOURCE_TOPIC,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_OFFSET,
)


@dataclass(frozen=True)
class FuzzConfig:
    """One fuzz scenario; the stream follows from ``seed``."""

    malformed: int = 200
    valid: int = 50
    seed: int = 0
    idle_timeout_s: float = 3.0
    run_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.malformed < 1 or self.valid < 1:
            raise ValueError("a fuzz stream needs malformed and valid records")


@dataclass
class FuzzResult:
    """What the fuzz scenario measured; ``failures()`` lists every broken promise."""

    config: dict[str, Any]
    records: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    consumed: int | None = None
    journal_rows: int = 0
    offsets_not_once: list[int] = field(default_factory=list)
    malformed_in_dlq: int = 0
    malformed_with_expected_reason: int = 0
    problems_malformed: list[str] = field(default_factory=list)
    valid_applied: int = 0
    valid_failed: int = 0
    valid_failed_in_dlq: int = 0
    problems_valid: list[str] = field(default_factory=list)
    unexpected_dlq: list[str] = field(default_factory=list)
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    run_s: float = 0.0
    total_s: float = 0.0

    def failures(self) -> list[str]:
        malformed, valid = self.config["malformed"], self.config["valid"]
        problems = []
        if self.exit_code != 0 or self.consumed != self.records:
            problems.append(
                f"daemon exit {self.exit_code}, consumed {self.consumed} of {self.records}"
            )
        if self.journal_rows != self.records or self.offsets_not_once:
            problems.append(
                f"{self.journal_rows} journal rows for {self.records} records; offsets not "
                f"once: {self.offsets_not_once[:10]}"
            )
        if self.malformed_in_dlq != malformed or self.malformed_with_expected_reason != malformed:
            problems.append(
                f"{self.malformed_in_dlq}/{malformed} malformed records in the DLQ, "
                f"{self.malformed_with_expected_reason} with the expected reason: "
                f"{self.problems_malformed[:10]}"
            )
        if self.valid_applied + self.valid_failed != valid or self.problems_valid:
            problems.append(
                f"valid records: {self.valid_applied} applied + {self.valid_failed} failed of "
                f"{valid}: {self.problems_valid[:10]}"
            )
        if self.valid_failed_in_dlq != self.valid_failed:
            problems.append(f"{self.valid_failed_in_dlq}/{self.valid_failed} failed edits in DLQ")
        if self.valid_applied == 0:
            problems.append("no valid event was applied; the stream tested nothing")
        if self.unexpected_dlq:
            problems.append(f"unexpected DLQ records: {self.unexpected_dlq[:10]}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_fuzz(bootstrap: str, workdir: Path, model_dir: Path, config: FuzzConfig) -> FuzzResult:
    """Run the scenario against the broker at ``bootstrap``; see the module docstring."""
    began = time.monotonic()
    items = fuzz_stream(config.seed, config.malformed, config.valid)
    result = FuzzResult(config=asdict(config), records=len(items))
    result.kinds = dict(Counter(item.kind for item in items))
    topic = f"fuzz-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, topic)
    _produce_keyed(bootstrap, topic, items)

    env = env_for(workdir / "daemon", bootstrap, topic, model_dir)
    config_path = config_file(Path(env["FACTKEEPER_HOME"]))
    started = time.monotonic()
    args = ("--idle-timeout", str(config.idle_timeout_s))
    with DaemonProcess(config_path, env, workdir / "daemon" / "daemon.log", args) as child:
        result.exit_code = child.wait(config.run_timeout_s)
        result.consumed = child.stats().get("consumed")
    result.run_s = round(time.monotonic() - started, 2)

    view = JournalView.read(journal_path(env))
    result.journal_rows = len(view.rows)
    per_offset = view.rows_per_offset()
    result.offsets_not_once = [o for o in range(len(items)) if per_offset[(topic, 0, o)] != 1]
    rows = {r.offset: r for r in view.rows if r.topic == topic}
    failed = sum(1 for r in view.rows if r.status == "failed")
    dlq = _dlq_by_offset(bootstrap, topic, config.malformed + failed, result)
    for offset, item in enumerate(items):
        row, records = rows.get(offset), dlq.pop(offset, [])
        if item.malformed:
            _check_malformed(offset, item, row, records, result)
        else:
            _check_valid(offset, item, row, records, result)
    result.unexpected_dlq = [f"offset {o}: {len(r)} records" for o, r in sorted(dlq.items())]
    result.total_s = round(time.monotonic() - began, 2)
    return result


def _produce_keyed(bootstrap: str, topic: str, items: list[StreamItem]) -> None:
    """Send in order, each with a key: a tombstone (no value) is only sendable with one."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=1024 * 1024)
    try:
        for offset, item in enumerate(items):
            producer.send(topic, key=f"fuzz-{offset}".encode(), value=item.payload)
        producer.flush()
    finally:
        producer.close()


def _dlq_by_offset(
    bootstrap: str, topic: str, expected: int, result: FuzzResult
) -> dict[int, list[Any]]:
    """DLQ records keyed by the source offset in their headers (records lacking it: -1)."""
    by_offset: dict[int, list[Any]] = {}
    reasons: Counter[str] = Counter()
    for record in dlq_records(bootstrap, topic, expected, timeout_s=60.0):
        headers = {k: v for k, v in record.headers}
        reasons[headers.get(HEADER_REASON, b"<none>").decode()] += 1
        offset = int(headers[HEADER_SOURCE_OFFSET]) if HEADER_SOURCE_OFFSET in headers else -1
        by_offset.setdefault(offset, []).append(record)
    result.dlq_reasons = dict(reasons)
    return by_offset


def _check_malformed(
    offset: int, item: StreamItem, row: JournalRow | None, records: list[Any], result: FuzzResult
) -> None:
    where = f"offset {offset} ({item.kind})"
    if len(records) != 1:
        result.problems_malformed.append(f"{where}: {len(records)} DLQ records")
        return
    headers = {k: v for k, v in records[0].headers}
    missing = [h for h in _REQUIRED_HEADERS if h not in headers]
    if missing or records[0].value != item.payload or records[0].key != f"fuzz-{offset}".encode():
        result.problems_malformed.append(f"{where}: missing headers {missing} or bytes/key changed")
        return
    result.malformed_in_dlq += 1
    reason = headers[HEADER_REASON].decode()
    expected_row = (
        ("duplicate", "conflicting-duplicate")
        if item.kind == "conflicting-duplicate"
        else ("invalid", reason)
    )
    got_row = (row.status, row.reason) if row is not None else None
    if reason in item.reasons and got_row == expected_row:
        result.malformed_with_expected_reason += 1
    else:
        result.problems_malformed.append(
            f"{where}: DLQ reason {reason!r}, expected {sorted(item.reasons)}; journal {got_row}"
        )


def _check_valid(
    offset: int, item: StreamItem, row: JournalRow | None, records: list[Any], result: FuzzResult
) -> None:
    where = f"offset {offset} ({item.event_id})"
    if row is None or row.event_id != item.event_id or row.status not in ("applied", "failed"):
        got = (row.event_id, row.status) if row is not None else None
        result.problems_valid.append(f"{where}: journal row {got}")
        return
    if row.payload != encode_event(parse_event(item.payload)).decode("utf-8"):
        result.problems_valid.append(f"{where}: the journal stored a different payload")
    if row.status == "applied":
        result.valid_applied += 1
        if records:
            result.problems_valid.append(f"{where}: applied, yet {len(records)} DLQ records")
        return
    result.valid_failed += 1
    reasons = [dict(r.headers).get(HEADER_REASON, b"").decode() for r in records]
    if reasons == ["edit-failed"]:
        result.valid_failed_in_dlq += 1
    else:
        result.problems_valid.append(f"{where}: failed edit with DLQ reasons {reasons}")
