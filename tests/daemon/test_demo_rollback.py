"""The demo rolls back only to an earlier version whose audit passed."""

from __future__ import annotations

from daemon.demo import _rollback_target
from daemon.versions.registry import VersionInfo


def _version(number: int, edits: int, passed: str | None, *aliases: str) -> VersionInfo:
    tags = {"edits": str(edits)}
    if passed is not None:
        tags["audit_passed"] = passed
    return VersionInfo(str(number), aliases, tags, {}, "")


def test_the_target_is_the_oldest_earlier_version_that_passed_its_audit():
    versions = [  # newest first, as the registry lists them
        _version(4, 40, "false", "latest"),
        _version(3, 30, "true", "production"),
        _version(2, 20, "true"),
        _version(1, 10, "false"),
        _version(0, 0, "true", "base"),
    ]
    assert _rollback_target(versions) == "2"


def test_no_target_when_only_failed_or_unaudited_versions_hold_edits():
    versions = [
        _version(3, 30, "false", "latest"),
        _version(2, 20, None),
        _version(1, 10, "true", "production"),
    ]
    assert _rollback_target(versions) is None
