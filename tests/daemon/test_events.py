"""fact-correction/v1: valid events round-trip; every bad input gets its reason code."""

from __future__ import annotations

import json
import time
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.errors import InvalidEventError
from daemon.ingest.events import (
    HEADER_DETAIL,
    HEADER_EVENT_ID,
    HEADER_REASON,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    HEADER_TIME,
    MAX_DLQ_DETAIL_BYTES,
    MAX_EVENT_BYTES,
    MAX_JSON_DEPTH,
    MAX_PROMPT_CHARS,
    MAX_REPHRASES,
    FactCorrection,
    dlq_headers,
    encode_event,
    parse_event,
    render_json_schema,
)
from daemon.ingest.payloads import nesting_depth
from tests.daemon.builders import event_dict, to_bytes

REPO = Path(__file__).resolve().parents[2]
REASONS = {
    "too-large",
    "invalid-utf8",
    "too-deep",
    "invalid-json",
    "schema-violation",
    "unsupported-schema",
    "subject-not-in-prompt",
}
FUZZ = settings(max_examples=150, deadline=None, database=None)


def reason_of(raw: bytes | None) -> str:
    with pytest.raises(InvalidEventError) as caught:
        parse_event(raw)
    return caught.value.reason_code


def test_valid_event_round_trips() -> None:
    event = parse_event(to_bytes(event_dict()))
    assert event.schema_id == "fact-correction/v1"
    assert event.subject in event.prompt
    assert event.locality_probes[0].answer == "Paris"
    assert event.created_at == datetime(2026, 5, 1, 12, tzinfo=UTC)
    wire = encode_event(event)
    assert json.loads(wire)["schema"] == "fact-correction/v1"
    assert parse_event(wire) == event


def test_optional_fields_default_to_empty() -> None:
    raw = event_dict()
    for key in ("target_old", "rephrases", "locality_probes"):
        del raw[key]
    event = parse_event(to_bytes(raw))
    assert (event.target_old, event.rephrases, event.locality_probes) == (None, (), ())


def test_text_is_stripped_and_nfc_normalised() -> None:
    subject = unicodedata.normalize("NFD", "Amélie Nothomb")
    prompt = "The native language of Amélie Nothomb is"  # NFC
    event = parse_event(
        to_bytes(event_dict(subject=f"  {subject} ", prompt=prompt, target_new=" English\n"))
    )
    assert event.subject == "Amélie Nothomb"
    assert event.target_new == "English"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid-json"),
        (b"", "invalid-json"),
        (None, "invalid-json"),
        (b'{"id": "a", "id": "b"}', "invalid-json"),
        (b'{"x": NaN}', "invalid-json"),
        (b'{"id": "\\ud800"}', "invalid-json"),
        (b"\xff\xfe{}", "invalid-utf8"),
        (b'{"subject": "\xc3"}', "invalid-utf8"),
        (b"[" * 5000 + b"]" * 5000, "too-deep"),
        (b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1), "too-deep"),
        (b" " * (MAX_EVENT_BYTES + 1), "too-large"),
        (b"\xff" * (MAX_EVENT_BYTES + 1), "too-large"),  # size is checked before UTF-8
        (b"[]", "schema-violation"),
        (b'"just a string"', "schema-violation"),
    ],
)
def test_bad_bytes_get_their_reason(raw: bytes | None, reason: str) -> None:
    assert reason_of(raw) == reason


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"id": 42}, "schema-violation"),
        ({"rephrases": "not a list"}, "schema-violation"),
        ({"created_at": 1_700_000_000}, "schema-violation"),
        ({"created_at": "2026-05-01T12:00:00"}, "schema-violation"),  # no offset
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "schema-violation"),
        ({"rephrases": ["a rephrase"] * (MAX_REPHRASES + 1)}, "schema-violation"),
        ({"locality_probes": [{"prompt": "p"}]}, "schema-violation"),
        ({"target_new": "   "}, "schema-violation"),
        ({"target_new": "English", "target_old": "English"}, "schema-violation"),
        ({"source": "bot\x07"}, "schema-violation"),
        ({"target_new": "Eng\u202elish"}, "invisible-character"),
        ({"target_new": "Eng\u200blish"}, "invisible-character"),  # zero-width space
        ({"target_new": "Eng\u200dlish"}, "invisible-character"),  # zero-width joiner
        ({"target_new": "Eng\u2060lish"}, "invisible-character"),  # word joiner
        ({"target_new": "Eng\u200flish"}, "invisible-character"),  # right-to-left mark
        ({"target_new": "Eng\u2067lish"}, "invisible-character"),  # bidi isolate
        ({"source": "\ufeffbot"}, "invisible-character"),  # BOM
        ({"source": "bot\u2028two"}, "invisible-character"),  # line separator
        ({"source": "bot\u2029two"}, "invisible-character"),  # paragraph separator
        ({"source": "bot\U000e0041\U000e007f"}, "invisible-character"),  # tag block
        ({"source": "a" * 250 + "\u0958" * 4}, "schema-violation"),  # 258 chars once NFC
        ({"subject": "Danielle Darrieux\u200b"}, "invisible-character"),
        ({"id": "has space"}, "schema-violation"),
        ({"id": "x" * 129}, "schema-violation"),
        ({"extra": "field"}, "schema-violation"),
        ({"schema_id": "fact-correction/v1"}, "schema-violation"),
        ({"schema": None}, "schema-violation"),
        ({"schema": "fact-correction/v2"}, "unsupported-schema"),
        ({"schema": "edit-request/v1"}, "unsupported-schema"),
        ({"prompt": "The mother tongue of D. Darrieux is"}, "subject-not-in-prompt"),
        ({"subject": "danielle darrieux"}, "subject-not-in-prompt"),
    ],
)
def test_bad_fields_get_their_reason(overrides: dict[str, Any], reason: str) -> None:
    assert reason_of(to_bytes(event_dict(**overrides))) == reason


def test_limits_apply_to_the_normalised_form() -> None:
    # U+0958 has no composed form: NFC gives two code points, so 254 input characters are 258
    # stored ones. The DLQ detail says which limit, after normalisation.
    with pytest.raises(InvalidEventError, match="after NFC normalisation, got 258"):
        parse_event(to_bytes(event_dict(source="a" * 250 + "\u0958" * 4)))
    assert parse_event(to_bytes(event_dict(source="a" * 248 + "\u0958" * 4))).source == (
        "a" * 248 + "\u0915\u093c" * 4
    )


def test_invisible_character_detail_names_the_character() -> None:
    with pytest.raises(InvalidEventError, match=r"U\+200B \(zero width space\)"):
        parse_event(to_bytes(event_dict(target_new="Eng\u200blish")))


def test_missing_required_field_is_a_schema_violation() -> None:
    raw = event_dict()
    del raw["target_new"]
    with pytest.raises(InvalidEventError, match="target_new: Field required"):
        parse_event(to_bytes(raw))


def test_error_carries_readable_id_and_names_the_field() -> None:
    with pytest.raises(InvalidEventError) as caught:
        parse_event(to_bytes(event_dict("cf:77", rephrases=[3])))
    assert caught.value.event_id == "cf:77"
    assert "rephrases.0" in caught.value.detail
    with pytest.raises(InvalidEventError) as caught:
        parse_event(to_bytes(event_dict("bad id\n", target_new=5)))
    assert caught.value.event_id is None


def test_unsupported_schema_says_which_version() -> None:
    with pytest.raises(InvalidEventError, match="major version 3"):
        parse_event(to_bytes(event_dict(schema="fact-correction/v3")))


def test_hostile_strings_are_rejected_in_linear_time() -> None:
    # Unterminated strings full of escaped quotes would make a naive string regex quadratic.
    payloads = [b'"' + b'\\"' * 30_000, b'{"a": "' + b"\\" * 60_000, b'["' * 30_000]
    started = time.perf_counter()
    for raw in payloads:
        assert reason_of(raw) in {"invalid-json", "too-deep"}
    assert time.perf_counter() - started < 1.0


def test_nesting_depth_ignores_brackets_inside_strings() -> None:
    assert nesting_depth('{"a": "[[[{{{", "b": [1, {"c": "]"}]}', stop_above=10) == 3
    assert nesting_depth('{"a": "\\"[["}', stop_above=10) == 1
    assert nesting_depth("[" * 100, stop_above=4) == 5


def test_dlq_headers_carry_reason_source_and_time() -> None:
    now = datetime(2026, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    headers = dict(
        dlq_headers("schema-violation", "id: bad", "fact-corrections", 3, 1234, now, event_id="e1")
    )
    assert headers == {
        HEADER_REASON: b"schema-violation",
        HEADER_DETAIL: b"id: bad",
        HEADER_SOURCE_TOPIC: b"fact-corrections",
        HEADER_SOURCE_PARTITION: b"3",
        HEADER_SOURCE_OFFSET: b"1234",
        HEADER_TIME: b"2026-05-01T12:30:00.000+00:00",
        HEADER_EVENT_ID: b"e1",
    }
    assert all(isinstance(value, bytes) for value in headers.values())


def test_dlq_detail_is_truncated_on_a_character_boundary() -> None:
    now = datetime.now(UTC)
    headers = dict(dlq_headers("edit-failed", "é" * 5000, "t", 0, 0, now))
    detail = headers[HEADER_DETAIL]
    assert len(detail) <= MAX_DLQ_DETAIL_BYTES
    assert detail.decode("utf-8").endswith("...")
    assert HEADER_EVENT_ID not in headers


def test_dlq_headers_need_an_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        dlq_headers("too-large", "x", "t", 0, 0, datetime(2026, 1, 1))


def test_committed_json_schema_matches_the_model() -> None:
    committed = (REPO / "schemas" / "fact_correction.v1.json").read_text(encoding="utf-8")
    assert committed == render_json_schema(), (
        'regenerate with: .venv/bin/python -c "from pathlib import Path; '
        "from daemon.ingest.events import write_json_schema; "
        "write_json_schema(Path('schemas/fact_correction.v1.json'))\""
    )


def test_json_schema_states_the_limits() -> None:
    schema = json.loads(render_json_schema())
    assert schema["additionalProperties"] is False
    assert schema["properties"]["prompt"]["maxLength"] == MAX_PROMPT_CHARS
    assert schema["properties"]["rephrases"]["maxItems"] == MAX_REPHRASES
    assert "schema" in schema["required"]


# -- properties ---------------------------------------------------------------------------------


def check_outcome(raw: bytes) -> None:
    """parse_event either returns a valid event or raises InvalidEventError with a known code."""
    try:
        event = parse_event(raw)
    except InvalidEventError as exc:
        assert exc.reason_code in REASONS
        assert exc.detail
        return
    assert isinstance(event, FactCorrection)
    assert event.subject in event.prompt
    assert parse_event(encode_event(event)) == event


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_another_error(raw: bytes) -> None:
    check_outcome(raw)


@FUZZ
@given(
    key=st.sampled_from([*event_dict(), "extra"]),
    value=json_values | st.text() | st.lists(st.text(max_size=40), max_size=12),
    drop=st.booleans(),
)
def test_mutated_events_never_escape_as_another_error(key: str, value: Any, drop: bool) -> None:
    raw = event_dict()
    if drop:
        raw.pop(key, None)
    else:
        raw[key] = value
    check_outcome(json.dumps(raw).encode("utf-8", errors="surrogatepass"))


@FUZZ
@given(data=st.data())
def test_truncated_and_corrupted_events_never_escape(data: st.DataObject) -> None:
    raw = bytearray(to_bytes(event_dict()))
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=3)
    )
    for position, byte in flips:
        raw[position] = byte
    check_outcome(bytes(raw[:cut]))


words = st.text(
    st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Zs")),
    min_size=1,
    max_size=30,
).filter(lambda text: text.strip() and not unicodedata.category(text.strip()[0]).startswith("M"))


@settings(max_examples=100, deadline=None, database=None)
@given(
    subject=words,
    before=words,
    after=words,
    target=words,
    when=st.datetimes(timezones=st.just(UTC)),
)
def test_generated_valid_events_parse_and_round_trip(
    subject: str, before: str, after: str, target: str, when: datetime
) -> None:
    raw = event_dict(
        subject=subject,
        prompt=f"{before} {subject} {after}",
        target_new=target,
        target_old=None,
        created_at=when.isoformat(),
    )
    event = parse_event(to_bytes(raw))
    assert event.subject == unicodedata.normalize("NFC", subject.strip())
    assert event.created_at == when
    assert parse_event(encode_event(event)) == event
