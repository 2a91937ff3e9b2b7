"""Typed errors of the daemon, so callers catch exactly the failure they can handle.

The CLI turns them into a one-line message and exit code 2 (``daemon/cli.py``). Invalid
payloads carry a short machine-readable ``reason_code`` that travels as a DLQ header and a metric
label, plus a ``detail`` for humans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from editing.configfile import ConfigError
from editing.errors import FactkeeperError

#: Why a payload was rejected; stable strings, used as DLQ headers and metric labels.
ReasonCode = Literal[
    "too-large",
    "invalid-utf8",
    "too-deep",
    "invalid-json",
    "schema-violation",
    "unsupported-schema",
    "subject-not-in-prompt",
    "invisible-character",
    "unknown-command",
]


class DaemonError(FactkeeperError):
    """Base class of every error the daemon raises on purpose."""


class SettingsError(DaemonError, ConfigError):
    """The daemon's settings file or ``FACTKEEPER_*`` variables are invalid.

    A ``ConfigError`` (``editing.configfile``), as an invalid algorithm config is, so one
    ``except ConfigError`` catches both; this one lists every problem with its field path.

    Args:
        problems: ``(field path, message)`` pairs, e.g. ``("kafka.session_timeout_ms", "...")``;
            every invalid field is listed, not only the first.
        source: what was being read (a file path or "environment"), named in the message.
    """

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid configuration{where}:"]
        lines += [f"  {path}: {message}" if path else f"  {message}" for path, message in problems]
        super().__init__("\n".join(lines))


class InvalidPayloadError(DaemonError):
    """Untrusted bytes (an event or a control command) were rejected.

    Args:
        reason_code: short kebab-case code such as ``too-large`` or ``schema-violation``.
        detail: what exactly was wrong, for a human reading the DLQ or the log.
        event_id: the producer's id when it could be read before the payload was rejected.
    """

    def __init__(self, reason_code: ReasonCode, detail: str, event_id: str | None = None) -> None:
        self.reason_code = reason_code
        self.detail = detail
        self.event_id = event_id
        super().__init__(f"{reason_code}: {detail}")


class InvalidEventError(InvalidPayloadError):
    """A fact-correction record failed validation; it goes to the DLQ with ``reason_code``."""


class InvalidControlError(InvalidPayloadError):
    """A control command failed validation; it is refused and logged, never executed."""


class JournalError(DaemonError):
    """The journal cannot be opened or would be left inconsistent by the requested write."""


class ReplayMismatchError(DaemonError):
    """Replaying a journaled edit did not reproduce the weight change the journal recorded.

    The weights after start-up would then differ from the ones the daemon had (another torch
    build or thread count, another editor checkpoint, a non-deterministic kernel); the daemon
    stops rather than serve them.
    """


class RetryLadderChangedError(ReplayMismatchError):
    """A journaled unit was applied by a retry-ladder rung that ``editor.retry_ladder`` no longer
    configures (removed, or its method or options changed): replay cannot build its editor.

    The daemon stops rather than rebuild the edit with another editor; restore the ladder the
    unit was applied with (the message names it) to start.
    """


class UnitDeltasError(DaemonError):
    """A journaled unit's stored deltas (``daemon.records.unit_deltas``) cannot be written or used.

    Never fatal: the stored deltas only spare replay the editor's work, so a unit without
    usable ones is re-edited, as replay did before they existed.
    """


class MissingUnitDeltasError(UnitDeltasError):
    """No stored deltas for the unit (never written, pruned, or journaled before they existed)."""


class CorruptUnitDeltasError(UnitDeltasError):
    """The unit's stored deltas are unreadable, or do not hash to the journal's ``delta_sha256``."""


class StaleUnitDeltasError(UnitDeltasError):
    """The unit's stored deltas were computed on weights that held other edits than the journal
    now puts before it (a revert or rollback since): only re-editing gives its deltas now."""


class JournalLockedError(JournalError):
    """Another process holds the journal's writer lock: two daemons must never write one journal.

    ``holder`` is what the lock file says about that process (host and pid), or "" if unknown.
    """

    def __init__(self, lock_path: str, holder: str) -> None:
        self.lock_path = lock_path
        self.holder = holder
        who = f" ({holder})" if holder else ""
        super().__init__(
            f"the journal is in use by another factkeeper process{who}: {lock_path} is locked; "
            "one daemon per journal (stop the other one, or give this one its own "
            "FACTKEEPER_HOME / journal.path)"
        )


class DuplicateEventError(JournalError):
    """Event ids that are already claimed by a journal row (or twice in one batch)."""

    def __init__(self, event_ids: Sequence[str]) -> None:
        self.event_ids = tuple(event_ids)
        super().__init__(
            f"event id(s) already journaled: {', '.join(self.event_ids)}; record a redelivery "
            "with status 'duplicate' instead of applying it again"
        )


class DuplicateOffsetError(JournalError):
    """Kafka positions that already have a journal row: each record is journaled exactly once."""

    def __init__(self, positions: Sequence[tuple[str, int, int]]) -> None:
        self.positions = tuple(positions)
        shown = ", ".join(f"{t}[{p}]@{o}" for t, p, o in self.positions)
        super().__init__(
            f"record(s) already journaled: {shown}; seek past Journal.last_offsets() on assignment"
        )


class UnknownEventError(JournalError):
    """Event ids that have no claiming journal row."""

    def __init__(self, event_ids: Sequence[str]) -> None:
        self.event_ids = tuple(event_ids)
        super().__init__(f"no journaled event with id(s): {', '.join(self.event_ids)}")


class JournalMismatchError(JournalError):
    """The journal does not describe the stream or registry it meets (issue 17, item 7).

    A re-created topic restarts at offset 0, so skipping "journaled" offsets would drop new
    corrections; an empty journal beside committed offsets or registered versions (a lost
    volume) would silently restart from the base model. Either needs an operator's decision.
    """

    FORCE_FLAG = "--accept-journal-mismatch"

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(
            f"{problem}. Refusing to start. If this is intended (the topic was re-created, or "
            f"the journal was deliberately reset), start once with `factkeeper run "
            f"{self.FORCE_FLAG}`: the journal rows of a re-created topic are kept under a "
            "retired topic name and its records are consumed anew; an empty journal starts "
            "from the base model."
        )


class HistoryError(DaemonError):
    """A rollback or revert was refused (unknown version, edit not applied, other base)."""


class ConsolidationError(DaemonError):
    """The editor's joint solve of the live set failed; the weights are as they were."""


class QuarantineDeliveryError(DaemonError):
    """The broker did not take a quarantine record (issue 17b, item 3).

    Raised by a failed audit before anything is marked ``quarantined`` or rolled back, so the
    journal never claims that an edit sits on the quarantine topic when it does not.
    """

    def __init__(self, topic: str, failures: Sequence[tuple[str, BaseException]]) -> None:
        self.topic = topic
        self.event_ids = tuple(event_id for event_id, _ in failures)
        first = failures[0][1]
        super().__init__(
            f"{len(failures)} quarantine record(s) not delivered to {topic!r} "
            f"(first: {type(first).__name__}: {first}); nothing was quarantined or rolled back"
        )
