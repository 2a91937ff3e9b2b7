"""Control commands (``pause``, ``resume``, ``audit``, ``snapshot``, ``consolidate``,
``rollback``, ``revert``).

Commands arrive on the control topic or the admin endpoint and change what the daemon does, so
they are validated as strictly as events: one JSON object whose ``command`` field selects the
variant. Executing them is the consumer's job; this module only says what a valid command is.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from daemon.errors import InvalidControlError, ReasonCode
from daemon.ingest.events import ID_PATTERN, EventId
from daemon.ingest.payloads import decode_json_object, describe_validation_error

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 4096
MAX_CONTROL_DEPTH = 2

_PATTERN_HINTS = {
    ID_PATTERN: "must start with a letter or digit and hold only letters, digits and . _ : -",
}


class _Command(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,
    )


class Pause(_Command):
    """Stop taking new events after the batch in flight; the consumer stays in its group."""

    command: Literal["pause"]


class Resume(_Command):
    """Take events again after a ``pause``."""

    command: Literal["resume"]


class RunAudit(_Command):
    """Run the retention/locality audit between batches, now rather than on schedule."""

    command: Literal["audit"]


class TakeSnapshot(_Command):
    """Register the current weights as a new version now, rather than on schedule."""

    command: Literal["snapshot"]


class Consolidate(_Command):
    """Re-solve every live edit jointly from the base weights now, rather than on schedule;
    the result is kept only if its audit is at least as good as the current weights'."""

    command: Literal["consolidate"]


class Rollback(_Command):
    """Move ``production`` to an earlier registered-model version and reload it."""

    command: Literal["rollback"]
    version: int = Field(ge=1)
    """The MLflow registered-model version to return to."""
    force: bool = False
    """Bring back edits the version holds that were reverted or quarantined since; without
    it they stay out (the weights are rebuilt without them)."""


class Revert(_Command):
    """Remove one applied edit: rebuild from the snapshot before it and replay the rest."""

    command: Literal["revert"]
    event_id: EventId
    """The id of the journaled event to revert."""


ControlCommand = Annotated[
    Pause | Resume | RunAudit | TakeSnapshot | Consolidate | Rollback | Revert,
    Field(discriminator="command"),
]
_ADAPTER: TypeAdapter[ControlCommand] = TypeAdapter(ControlCommand)
#: The accepted ``command`` values, read off the variants so the list cannot drift.
COMMAND_NAMES: tuple[str, ...] = tuple(
    get_args(variant.model_fields["command"].annotation)[0]
    for variant in (Pause, Resume, RunAudit, TakeSnapshot, Consolidate, Rollback, Revert)
)


def parse_control(raw: bytes | bytearray | memoryview | None) -> ControlCommand:
    """Validate one control payload (Kafka record value or HTTP body).

    Raises:
        InvalidControlError: ``reason_code`` is ``too-large``, ``invalid-utf8``, ``too-deep``,
            ``invalid-json``, ``unknown-command`` or ``schema-violation``.
    """
    text, _ = decode_json_object(
        raw, max_bytes=MAX_CONTROL_BYTES, max_depth=MAX_CONTROL_DEPTH, error=InvalidControlError
    )
    try:
        return _ADAPTER.validate_json(text, strict=True)
    except ValidationError as exc:
        raise InvalidControlError(_reason(exc), _describe(exc)) from None


def encode_control(command: ControlCommand) -> bytes:
    """The wire form of a command, for the CLI and tests that send one."""
    return _ADAPTER.dump_json(command)


def control_json_schema() -> dict[str, object]:
    """The JSON Schema of a control command, for admin clients."""
    return _ADAPTER.json_schema()


def _describe(exc: ValidationError) -> str:
    """Like other payload errors, but never echoes an unknown command name back."""
    types = {err["type"] for err in exc.errors()}
    if types & {"union_tag_invalid", "union_tag_not_found"}:
        return f"command must be one of: {', '.join(COMMAND_NAMES)}"
    return describe_validation_error(exc, _PATTERN_HINTS)


def _reason(exc: ValidationError) -> ReasonCode:
    types = {err["type"] for err in exc.errors()}
    if "json_invalid" in types:
        return "invalid-json"
    if "union_tag_invalid" in types:
        return "unknown-command"
    return "schema-violation"
