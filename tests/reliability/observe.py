"""Watching a daemon from outside: its journal, its process, its readiness endpoint.

The scenarios judge a daemon only by what an operator could see: the journal file (opened
read-only, so a reader can never race the daemon's own migration or hold a write lock), the
process in ``/proc``, and ``/readyz``; only the journal's status names come from the daemon.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from daemon.records.journal import UNCLAIMED_STATUSES


@dataclass(frozen=True)
class JournalRow:
    """One journaled record, as stored."""

    seq: int
    event_id: str | None
    topic: str
    partition: int
    offset: int
    status: str
    reason: str | None
    payload: str | None

    @property
    def claims(self) -> bool:
        """Whether this row claims its event id (applied, failed, rolled back, ...)."""
        return self.event_id is not None and self.status not in UNCLAIMED_STATUSES


@dataclass(frozen=True)
class JournalView:
    """Every row of a journal, read once; the checks the scenarios make on it."""

    rows: tuple[JournalRow, ...]

    @classmethod
    def read(cls, path: Path) -> JournalView:
        """All rows in seq order; empty if the daemon has not created the table yet."""
        try:
            with _read_only(path) as conn:
                rows = conn.execute(
                    'SELECT seq, event_id, topic, "partition", "offset", status, reason, payload '
                    "FROM events ORDER BY seq"
                ).fetchall()
        except sqlite3.Error:
            return cls(())
        return cls(tuple(JournalRow(*row) for row in rows))

    def statuses(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.rows))

    def ids_with(self, status: str) -> list[str]:
        return [r.event_id for r in self.rows if r.status == status and r.event_id is not None]

    def claims_per_id(self) -> Counter[str]:
        """How many rows claim each event id; the journal promises at most one."""
        return Counter(r.event_id for r in self.rows if r.claims)

    def rows_per_offset(self) -> Counter[tuple[str, int, int]]:
        """How many rows each (topic, partition, offset) has; every record gets exactly one."""
        return Counter((r.topic, r.partition, r.offset) for r in self.rows)

    def last_offsets(self, topic: str) -> dict[int, int]:
        """The highest journaled offset per partition of ``topic``."""
        last: dict[int, int] = {}
        for r in self.rows:
            if r.topic == topic:
                last[r.partition] = max(last.get(r.partition, -1), r.offset)
        return last


def journal_progress(path: Path) -> int:
    """Rows journaled so far (0 before the daemon created its journal); cheap enough to poll."""
    try:
        with _read_only(path) as conn:
            return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
    except sqlite3.Error:
        return 0


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only SQLite connection, closed on exit (sqlite3's own ``with`` only commits)."""
    if not path.exists():
        raise sqlite3.OperationalError(f"no journal at {path} yet")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        yield conn
    finally:
        conn.close()


def offsets_ahead(committed: dict[int, int | None], journaled: dict[int, int]) -> list[str]:
    """Partitions whose committed offset is ahead of the journal (a lost record if it crashed).

    The consumer commits ``offset + 1`` only after the row for ``offset`` is durable, so a
    committed offset may trail the journal (a crash between journal and commit) but never lead.
    """
    problems = []
    for partition, offset in sorted(committed.items()):
        if offset is None:
            continue
        limit = journaled.get(partition, -1) + 1
        if offset > limit:
            problems.append(f"partition {partition}: committed {offset} > journaled + 1 = {limit}")
    return problems


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process from ``/proc``."""

    t: float  # seconds since the sampler started
    rss_bytes: int
    threads: int
    fds: int
    progress: int  # journal rows at the time


def read_proc(pid: int) -> tuple[int, int, int]:
    """(VmRSS in bytes, thread count, open file descriptors) of a live process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    rss = int(fields["VmRSS"].split()[0]) * 1024  # "123456 kB"
    return rss, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


class ProcSampler:
    """Samples a process's RSS, threads and fds every ``period_s`` in a background thread."""

    def __init__(self, pid: int, journal: Path, period_s: float = 0.5) -> None:
        self.pid = pid
        self.journal = journal
        self.period_s = period_s
        self.samples: list[ProcSample] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                rss, threads, fds = read_proc(self.pid)
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return  # the process exited
            self.samples.append(
                ProcSample(
                    round(time.monotonic() - self._started, 3),
                    rss,
                    threads,
                    fds,
                    journal_progress(self.journal),
                )
            )
            self._done.wait(self.period_s)


@dataclass(frozen=True)
class ReadySample:
    """One ``/readyz`` answer: ``ready`` is None when nothing answered."""

    t: float  # time.monotonic()
    ready: bool | None
    conditions: dict[str, bool] = field(default_factory=dict)


class ReadyzPoller:
    """Polls ``http://host:port/readyz`` every ``period_s`` in a background thread."""

    def __init__(self, port: int, host: str = "127.0.0.1", period_s: float = 0.25) -> None:
        self.url = f"http://{host}:{port}/readyz"
        self.period_s = period_s
        self.samples: list[ReadySample] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readyz-poller", daemon=True)

    def __enter__(self) -> ReadyzPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.is_set():
            self.samples.append(self.probe())
            self._done.wait(self.period_s)

    def probe(self) -> ReadySample:
        """One ``/readyz`` request now (also usable while the poller runs)."""
        now = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=2.0) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:  # 503: it answered, and is not ready
            raw = err.read()
        except OSError:  # nothing listening (yet, or any more)
            return ReadySample(now, None)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return ReadySample(now, None)
        return ReadySample(now, bool(body.get("ready")), dict(body.get("conditions", {})))

    def wait_until(self, ready: bool, timeout_s: float, after: float = 0.0) -> float | None:
        """Block until a sample taken at or after ``after`` says ``ready``; that sample's time.

        Returns None if no such sample came within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for sample in self.samples[seen:]:
                if sample.t >= after and sample.ready is ready:
                    return sample.t
            seen = len(self.samples)
            time.sleep(self.period_s / 2)
        return None
