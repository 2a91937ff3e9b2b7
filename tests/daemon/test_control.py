"""Control commands: each variant parses and round-trips; bad commands get a reason code."""

from __future__ import annotations

import pytest

from daemon.control.commands import (
    COMMAND_NAMES,
    MAX_CONTROL_BYTES,
    Pause,
    Resume,
    Revert,
    Rollback,
    RunAudit,
    TakeSnapshot,
    control_json_schema,
    encode_control,
    parse_control,
)
from daemon.errors import InvalidControlError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"command": "pause"}', Pause(command="pause")),
        (b'{"command": "resume"}', Resume(command="resume")),
        (b'{"command": "audit"}', RunAudit(command="audit")),
        (b'{"command": "rollback", "version": 7}', Rollback(command="rollback", version=7)),
        (b'{"command": "snapshot"}', TakeSnapshot(command="snapshot")),
        (b'{"command": "revert", "event_id": "cf:12"}', Revert(command="revert", event_id="cf:12")),
    ],
)
def test_each_command_parses_and_round_trips(raw: bytes, expected: object) -> None:
    command = parse_control(raw)
    assert command == expected
    assert parse_control(encode_control(command)) == command


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"command": "explode"}', "unknown-command"),
        (b"{}", "schema-violation"),
        (b'{"command": "rollback"}', "schema-violation"),
        (b'{"command": "rollback", "version": "7"}', "schema-violation"),
        (b'{"command": "rollback", "version": 0}', "schema-violation"),
        (b'{"command": "revert", "event_id": "../etc"}', "schema-violation"),
        (b'{"command": "pause", "force": true}', "schema-violation"),
        (b'{"command": ["pause"]}', "unknown-command"),
        (b"pause", "invalid-json"),
        (b"\xc3(", "invalid-utf8"),
        (b'{"command": {"nested": {}}}', "too-deep"),
        (b" " * (MAX_CONTROL_BYTES + 1), "too-large"),
    ],
)
def test_bad_commands_get_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidControlError) as caught:
        parse_control(raw)
    assert caught.value.reason_code == reason


def test_unknown_command_is_not_echoed() -> None:
    with pytest.raises(InvalidControlError) as caught:
        parse_control(b'{"command": "<script>"}')
    assert "<script>" not in caught.value.detail
    assert "pause" in caught.value.detail


def test_command_names_match_the_schema() -> None:
    mapping = control_json_schema()["discriminator"]["mapping"]
    assert (
        set(mapping)
        == set(COMMAND_NAMES)
        == {
            "pause",
            "resume",
            "audit",
            "snapshot",
            "consolidate",
            "rollback",
            "revert",
        }
    )
