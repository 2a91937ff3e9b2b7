"""The ``fact-correction/v1`` event: the only input that changes the model, so it is bounded.

Producers send one JSON object per Kafka record. ``parse_event`` turns the record's bytes into a
validated, immutable ``FactCorrection`` or raises ``InvalidEventError`` with a reason code; the
consumer then sends the ORIGINAL bytes to the DLQ with the headers from ``dlq_headers``. Every
limit lives in the constants below, and the JSON schema committed for producers
(``schemas/fact_correction.v1.json``) is generated from this module.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from daemon.errors import InvalidEventError, ReasonCode
from daemon.ingest.payloads import decode_json_object, describe_validation_error

log = logging.getLogger(__name__)

# -- Limits: the one place that bounds an event -------------------------------------------------

SCHEMA_V1 = "fact-correction/v1"
MAX_EVENT_BYTES = 64 * 1024
MAX_JSON_DEPTH = 4  # the object, locality_probes, a probe: 3, plus one for clearer errors
MAX_ID_CHARS = 128
MAX_SUBJECT_CHARS = 256
MAX_PROMPT_CHARS = 512
MAX_TARGET_CHARS = 256
MAX_SOURCE_CHARS = 256
MAX_REPHRASES = 10
MAX_LOCALITY_PROBES = 10
MAX_DLQ_DETAIL_BYTES = 1024

#: Producer ids: letters, digits and ``. _ : -`` (UUIDs, ``dataset:1234``), starting alphanumeric.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
#: C0/C1 control characters except tab, newline and carriage return.
_CONTROL_CHARS = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
#: Characters that render as nothing (or reorder what is shown), so displayed text differs from
#: stored text: zero-width space/joiners and the LRM/RLM marks (U+200B-U+200F), line and
#: paragraph separators plus the bidi embeddings/overrides (U+2028-U+202E), the word joiner
#: (U+2060), the bidi isolates (U+2066-U+2069), the BOM (U+FEFF) and the tag block.
_INVISIBLE_CHARS = "\u200b-\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff\U000e0000-\U000e007f"
_CONTROL_RE = re.compile(f"[{_CONTROL_CHARS}]")
_INVISIBLE_RE = re.compile(f"[{_INVISIBLE_CHARS}]")
TEXT_PATTERN = f"^[^{_CONTROL_CHARS}{_INVISIBLE_CHARS}]*$"
#: The same rule for producers' JSON Schema validators, in ECMA-262 escapes on UTF-16 code
#: units (the tag block is U+DB40 followed by U+DC00-U+DC7F); the daemon checks in Python.
SCHEMA_TEXT_PATTERN = (
    r"^(?:[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060"
    r"\u2066-\u2069\ufeff\udb40]|\udb40[^\udc00-\udc7f])*$"
)
#: Validation context key: the text was read back from the journal, where it was stored after
#: passing every input check once; limits are never re-applied to it (issue 17, item 4).
STORED_CONTEXT = "factkeeper.stored"

_PATTERN_HINTS = {
    ID_PATTERN: "must start with a letter or digit and hold only letters, digits and . _ : -",
}
_SCHEMA_NAME = re.compile(r"fact-correction/v(\d+)(?:\.\d+)*")

#: Reasons a record goes to the DLQ: a rejected payload, or an edit that did not take.
DlqReason = Literal[ReasonCode, "edit-failed", "conflicting-duplicate"]

# DLQ header names; values are UTF-8 bytes.
HEADER_REASON = "factkeeper.reason"
HEADER_DETAIL = "factkeeper.detail"
HEADER_SOURCE_TOPIC = "factkeeper.source-topic"
HEADER_SOURCE_PARTITION = "factkeeper.source-partition"
HEADER_SOURCE_OFFSET = "factkeeper.source-offset"
HEADER_TIME = "factkeeper.time"
HEADER_EVENT_ID = "factkeeper.event-id"


def _nfc(value: str) -> str:
    """One normal form, so the subject is found in the prompt however the producer composed it."""
    return unicodedata.normalize("NFC", value)


def is_stored(info: ValidationInfo) -> bool:
    """Whether this validation reads a journaled event back (``STORED_CONTEXT`` is set)."""
    return bool(isinstance(info.context, dict) and info.context.get(STORED_CONTEXT))


def _checked_text(max_chars: int) -> Any:
    """Normalise to NFC, then check the text as it will be stored.

    The limits apply to the normalised form because that is what the journal, the editor and
    every later read see: NFC can lengthen a string (U+0958 becomes two code points), so a
    check before it let through events that later reads rejected (issue 17, item 4).
    """

    def check(value: str, info: ValidationInfo) -> str:
        text = _nfc(value)
        if is_stored(info):
            return text
        if not text:
            raise PydanticCustomError("string_too_short", "must not be empty")
        control = _CONTROL_RE.search(text)
        if control:
            raise PydanticCustomError(
                "forbidden_character",
                "must not contain control characters (other than tab, newline, carriage "
                "return); found {char}",
                {"char": f"U+{ord(control.group()):04X}"},
            )
        invisible = _INVISIBLE_RE.search(text)
        if invisible:
            char = invisible.group()
            name = unicodedata.name(char, "unnamed").lower()
            raise PydanticCustomError(
                "invisible_character",
                "must not contain invisible or bidirectional characters; found {char} ({name})",
                {"char": f"U+{ord(char):04X}", "name": name},
            )
        if len(text) > max_chars:
            raise PydanticCustomError(
                "string_too_long",
                "at most {max_chars} characters after NFC normalisation, got {length}",
                {"max_chars": max_chars, "length": len(text)},
            )
        return text

    return check


def _text(max_chars: int) -> Any:
    """A stripped, non-empty, NFC-normalised string of at most ``max_chars`` characters."""
    return Annotated[
        str,
        StringConstraints(strip_whitespace=True),
        AfterValidator(_checked_text(max_chars)),
        WithJsonSchema(
            {
                "type": "string",
                "minLength": 1,
                "maxLength": max_chars,
                "pattern": SCHEMA_TEXT_PATTERN,
            }
        ),
    ]


EventId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
]
Subject = _text(MAX_SUBJECT_CHARS)
Prompt = _text(MAX_PROMPT_CHARS)
Target = _text(MAX_TARGET_CHARS)
Source = _text(MAX_SOURCE_CHARS)


class _Strict(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,
    )


class LocalityProbe(_Strict):
    """An unrelated prompt whose answer the edit must not change."""

    prompt: Prompt
    answer: Target


class FactCorrection(_Strict):
    """One fact correction. Text fields are stripped and NFC-normalised when parsed."""

    model_config = ConfigDict(
        title="fact-correction/v1",
        json_schema_extra={
            "description": (
                f"One fact correction for factkeeper. A record is at most {MAX_EVENT_BYTES} "
                f"bytes of UTF-8 JSON nested at most {MAX_JSON_DEPTH} levels, without duplicate "
                "keys. Text fields are stripped of surrounding whitespace and NFC-normalised; "
                "the subject must occur in the prompt."
            )
        },
    )

    schema_id: Literal["fact-correction/v1"] = Field(alias="schema")
    """Schema name and major version; other versions are rejected as unsupported."""
    id: EventId
    """Unique per producer; the daemon applies each id at most once."""
    subject: Subject
    """The entity the fact is about; must occur in ``prompt``."""
    prompt: Prompt
    """The fact as a prompt the model completes, e.g. 'The mother tongue of X is'."""
    target_new: Target
    """The corrected completion."""
    target_old: Target | None = None
    """The completion being replaced, when the producer knows it."""
    rephrases: tuple[Prompt, ...] = Field(default=(), max_length=MAX_REPHRASES, strict=False)
    """Paraphrases of ``prompt`` used to measure generalisation."""
    locality_probes: tuple[LocalityProbe, ...] = Field(
        default=(), max_length=MAX_LOCALITY_PROBES, strict=False
    )
    """Unrelated prompts whose answers must not change."""
    source: Source
    """Who or what produced the correction (a dataset, a service, a reviewer)."""
    created_at: AwareDatetime
    """When the producer created the event, ISO-8601 with a UTC offset."""

    @model_validator(mode="after")
    def _check_fact(self, info: ValidationInfo) -> FactCorrection:
        if is_stored(info):
            return self
        if self.subject not in self.prompt:
            raise PydanticCustomError(
                "subject_not_in_prompt", "the subject does not occur in the prompt"
            )
        if self.target_old is not None and self.target_old == self.target_new:
            raise PydanticCustomError(
                "target_unchanged", "target_new equals target_old, so there is nothing to edit"
            )
        return self


def parse_event(raw: bytes | bytearray | memoryview | None) -> FactCorrection:
    """Validate one record value, cheapest checks first.

    Order: byte size, UTF-8, nesting depth, JSON (no duplicate keys), schema name, then the
    strict pydantic model. The first failing check decides the reason code.

    Raises:
        InvalidEventError: with ``reason_code`` one of ``too-large``, ``invalid-utf8``,
            ``too-deep``, ``invalid-json``, ``unsupported-schema``, ``schema-violation``,
            ``subject-not-in-prompt``, ``invisible-character``; ``event_id`` is set when the
            id could be read.
    """
    text, obj = decode_json_object(
        raw, max_bytes=MAX_EVENT_BYTES, max_depth=MAX_JSON_DEPTH, error=InvalidEventError
    )
    event_id = _readable_id(obj.get("id"))
    schema = obj.get("schema")
    if isinstance(schema, str) and schema != SCHEMA_V1:
        match = _SCHEMA_NAME.fullmatch(schema)
        what = f"major version {match.group(1)}" if match else f"schema {ascii(schema[:64])}"
        raise InvalidEventError(
            "unsupported-schema",
            f"{what} is not supported; this daemon reads {SCHEMA_V1}",
            event_id,
        )
    try:
        return FactCorrection.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise InvalidEventError(_reason(exc), _describe(exc), event_id) from None


def stored_event(payload: str | bytes) -> FactCorrection:
    """An event as the journal stored it: parsed strictly, but without the input limits.

    A row was validated once, when it was consumed; re-applying limits on read would turn a
    limit change (or the NFC bug of issue 17) into a daemon that cannot restart.
    """
    return FactCorrection.model_validate_json(payload, strict=True, context={STORED_CONTEXT: True})


def encode_event(event: FactCorrection) -> bytes:
    """The wire form of an event (what a producer sends and what the journal stores)."""
    return event.model_dump_json(by_alias=True).encode("utf-8")


def dlq_headers(
    reason: DlqReason,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    now: datetime,
    *,
    event_id: str | None = None,
) -> list[tuple[str, bytes]]:
    """Headers of the DLQ record whose value is the original bytes of the rejected record.

    Args:
        reason: the reason code, e.g. ``InvalidEventError.reason_code`` or ``edit-failed``.
        detail: human detail; truncated to ``MAX_DLQ_DETAIL_BYTES`` on a character boundary.
        topic, partition, offset: where the original record was read.
        now: an aware datetime, written as ISO-8601 UTC.
        event_id: the producer's id, when known.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    headers = [
        (HEADER_REASON, reason.encode("ascii")),
        (HEADER_DETAIL, _truncate_utf8(detail, MAX_DLQ_DETAIL_BYTES)),
        (HEADER_SOURCE_TOPIC, topic.encode("utf-8")),
        (HEADER_SOURCE_PARTITION, str(partition).encode("ascii")),
        (HEADER_SOURCE_OFFSET, str(offset).encode("ascii")),
        (HEADER_TIME, now.astimezone(UTC).isoformat(timespec="milliseconds").encode("ascii")),
    ]
    if event_id is not None:
        headers.append((HEADER_EVENT_ID, event_id.encode("utf-8")))
    return headers


def fact_correction_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that producers can validate against."""
    schema = FactCorrection.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render_json_schema() -> str:
    """The committed text of ``schemas/fact_correction.v1.json`` (ASCII, stable order)."""
    return json.dumps(fact_correction_json_schema(), indent=2, ensure_ascii=True) + "\n"


def write_json_schema(path: Path) -> None:
    """Regenerate the committed schema file after a change to the model or its limits."""
    path.write_text(render_json_schema(), encoding="utf-8")


def _reason(exc: ValidationError) -> ReasonCode:
    types = {err["type"] for err in exc.errors()}
    if "json_invalid" in types:  # e.g. a lone surrogate escape that Python's json accepted
        return "invalid-json"
    if "subject_not_in_prompt" in types:
        return "subject-not-in-prompt"
    if "invisible_character" in types:
        return "invisible-character"
    return "schema-violation"


def _describe(exc: ValidationError) -> str:
    return describe_validation_error(exc, _PATTERN_HINTS)


def _readable_id(value: Any) -> str | None:
    """The id, only if it is safe to put in a header and a log line."""
    ok = isinstance(value, str) and len(value) <= MAX_ID_CHARS
    return value if ok and re.fullmatch(ID_PATTERN, value) else None


def _truncate_utf8(text: str, limit: int) -> bytes:
    data = text.encode("utf-8", errors="backslashreplace")
    if len(data) <= limit:
        return data
    return data[: limit - 3].decode("utf-8", errors="ignore").encode("utf-8") + b"..."
