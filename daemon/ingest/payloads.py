"""Bounded decoding of untrusted JSON payloads (fact corrections and control commands).

Anything read from Kafka or HTTP is hostile until proven otherwise, so the cheap checks run
first and in a fixed order: byte size before decoding, strict UTF-8, nesting depth before any
parser recurses, then JSON without duplicate keys or non-finite numbers. Pydantic only ever sees
a payload that passed all of them. Every rejection is a typed error with a short reason code.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from pydantic import ValidationError

from daemon.errors import InvalidPayloadError

log = logging.getLogger(__name__)

#: A complete JSON string (possessive, so an unterminated one costs one linear scan), a bracket,
#: or a lone quote that starts an unterminated string.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]|"', re.DOTALL)

#: How many validation errors a detail message lists before it says "and N more".
MAX_LISTED_ERRORS = 5


class _DuplicateKeyError(ValueError):
    """Raised from the JSON object hook; two parsers could disagree on which value wins."""


def decode_json_object(
    raw: bytes | bytearray | memoryview | None,
    *,
    max_bytes: int,
    max_depth: int,
    error: type[InvalidPayloadError],
) -> tuple[str, dict[str, Any]]:
    """Check and decode one payload into its text and its top-level JSON object.

    Args:
        raw: the record value; ``None`` is a Kafka tombstone.
        max_bytes: size limit, checked before anything is decoded.
        max_depth: deepest allowed nesting of arrays and objects (the top object is depth 1).
        error: the ``InvalidPayloadError`` subclass to raise.

    Returns:
        The decoded text (for a strict pydantic JSON parse) and the parsed object.

    Raises:
        InvalidPayloadError: of class ``error`` with reason ``too-large``, ``invalid-utf8``,
            ``too-deep``, ``invalid-json`` or ``schema-violation`` (top level not an object).
    """
    if raw is None:
        raise error("invalid-json", "the record has no value (a tombstone)")
    size = len(raw) if not isinstance(raw, memoryview) else raw.nbytes
    if size > max_bytes:
        raise error("too-large", f"{size} bytes, the limit is {max_bytes}")
    try:
        text = bytes(raw).decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise error("invalid-utf8", f"{exc.reason} at byte {exc.start}") from None
    depth = nesting_depth(text, stop_above=max_depth)
    if depth > max_depth:
        raise error("too-deep", f"JSON nesting deeper than {max_depth} levels")
    try:
        value = json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except RecursionError:  # the depth scan makes this unreachable for well-formed input
        raise error("too-deep", f"JSON nesting deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, over-long integers
        raise error("invalid-json", _short(str(exc))) from None
    if not isinstance(value, dict):
        raise error("schema-violation", f"the top level must be a JSON object, not {_kind(value)}")
    return text, value


def nesting_depth(text: str, *, stop_above: int) -> int:
    """Deepest nesting of ``[`` and ``{`` outside strings, in one linear pass.

    Stops counting once the depth exceeds ``stop_above``, so a hostile ``[[[[...`` costs only
    ``stop_above`` steps. An unterminated string ends the scan: the JSON parser rejects it next.
    """
    depth = deepest = 0
    for match in _TOKEN.finditer(text):
        char = text[match.start()]
        if char == '"':
            if match.end() - match.start() == 1:
                break
            continue
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > stop_above:
                break
        else:
            depth -= 1
    return deepest


def describe_validation_error(
    exc: ValidationError, pattern_hints: Mapping[str, str] | None = None
) -> str:
    """One line naming each invalid field, without echoing the (possibly huge) input.

    Args:
        exc: the pydantic error.
        pattern_hints: human wording for a regex pattern, instead of the raw pattern.
    """
    hints = pattern_hints or {}
    errors = exc.errors(include_url=False, include_input=False)
    parts = []
    for err in errors[:MAX_LISTED_ERRORS]:
        where = ".".join(_short(str(part), 64) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "string_pattern_mismatch":
            pattern = str(err.get("ctx", {}).get("pattern", ""))
            message = hints.get(pattern, f"does not match the pattern {ascii(pattern)}")
        else:
            message = err["msg"]
        parts.append(f"{ascii(where)[1:-1]}: {message}" if where else message)
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more")
    return "; ".join(parts)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(f"duplicate key {_short(ascii(key), 64)}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
