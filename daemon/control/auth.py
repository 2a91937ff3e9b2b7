"""Who may send control commands: a bearer token over HTTP, signed records on the control topic.

A control command can roll the model back or revert an edit, so the two paths use two separate
secrets. Over HTTP the caller presents ``admin.token`` as ``Authorization: Bearer <token>``. On
the control topic a record must carry an HMAC-SHA256 under one of the ``control.keys`` (key ids
allow rotation: add the new key, switch the senders, remove the old one), over the value *and*
the topic, the consumer group, the issue time and a random nonce. The daemon rejects a record
signed for another topic or group, one issued more than ``control.max_age_s`` ago (or that far
in the future), and a nonce it has already seen (kept in the journal for that window), so a
signed record cannot be replayed. Unsigned records run only when ``control.allow_unsigned`` is
set explicitly (local demos and tests). Comparisons are constant-time; secrets are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import SecretStr

SIGNATURE_HEADER = "factkeeper-signature"
"""``hex(HMAC-SHA256(key, signed_message(...)))`` as ASCII bytes."""
KEY_ID_HEADER = "factkeeper-key-id"
ISSUED_AT_HEADER = "factkeeper-issued-at"
"""Unix seconds (decimal ASCII) when the sender signed the record."""
NONCE_HEADER = "factkeeper-nonce"
"""32 hex characters, random per record."""
SCHEME = b"factkeeper-control/v2"
MAX_NONCE_CHARS = 64

Headers = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one control record; ``reason`` is set when refused."""

    ok: bool
    reason: str | None = None
    key_id: str | None = None
    nonce: str | None = None
    issued_at: float | None = None


def _secret(key: str | SecretStr) -> bytes:
    value = key.get_secret_value() if isinstance(key, SecretStr) else key
    if not value:
        raise ValueError("a secret must not be empty")
    return value.encode("utf-8")


def signed_message(
    value: bytes, *, topic: str, group: str, key_id: str, issued_at: str, nonce: str
) -> bytes:
    """The bytes the HMAC covers: every field that makes a record valid in one place only."""
    parts = [SCHEME, key_id.encode(), topic.encode(), group.encode(), issued_at.encode()]
    return b"\n".join([*parts, nonce.encode(), bytes(value)])


def sign_control(
    value: bytes,
    *,
    key_id: str,
    key: str | SecretStr,
    topic: str,
    group: str,
    now: float | None = None,
) -> list[tuple[str, bytes]]:
    """Kafka headers that make ``value`` a control record for ``topic`` and ``group``.

    Usage: ``producer.send(topic, value=raw, headers=sign_control(raw, key_id=..., ...))``.
    """
    issued_at = str(int(time.time() if now is None else now))
    nonce = secrets.token_hex(16)
    message = signed_message(
        value, topic=topic, group=group, key_id=key_id, issued_at=issued_at, nonce=nonce
    )
    signature = hmac.new(_secret(key), message, hashlib.sha256).hexdigest()
    return [
        (KEY_ID_HEADER, key_id.encode()),
        (ISSUED_AT_HEADER, issued_at.encode()),
        (NONCE_HEADER, nonce.encode()),
        (SIGNATURE_HEADER, signature.encode("ascii")),
    ]


def verify_control(
    value: bytes | None,
    headers: Headers | None,
    *,
    keys: Mapping[str, SecretStr | str],
    topic: str,
    group: str,
    max_age_s: float,
    now: float | None = None,
) -> Verdict:
    """Check a record's signature, scope and age; the caller then checks the nonce is new."""
    if value is None:
        return Verdict(False, "no value")
    found: dict[str, list[bytes]] = {}
    for name, raw in headers or ():
        if isinstance(raw, bytes | bytearray):
            found.setdefault(name, []).append(bytes(raw))
    fields = {}
    for name in (KEY_ID_HEADER, ISSUED_AT_HEADER, NONCE_HEADER, SIGNATURE_HEADER):
        values = found.get(name, [])
        if len(values) != 1:
            return Verdict(False, f"missing or repeated {name} header")
        try:
            fields[name] = values[0].decode("ascii").strip()
        except UnicodeDecodeError:
            return Verdict(False, f"{name} is not ASCII")
    key_id, nonce = fields[KEY_ID_HEADER], fields[NONCE_HEADER]
    if key_id not in keys:
        return Verdict(False, "unknown key id")
    if not nonce or len(nonce) > MAX_NONCE_CHARS:
        return Verdict(False, "bad nonce")
    if not fields[ISSUED_AT_HEADER].isdigit():
        return Verdict(False, "bad issued-at")
    message = signed_message(
        value,
        topic=topic,
        group=group,
        key_id=key_id,
        issued_at=fields[ISSUED_AT_HEADER],
        nonce=nonce,
    )
    expected = hmac.new(_secret(keys[key_id]), message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(fields[SIGNATURE_HEADER].lower().encode(), expected.encode()):
        return Verdict(False, "wrong signature (or signed for another topic or group)")
    issued_at = float(fields[ISSUED_AT_HEADER])
    age = (time.time() if now is None else now) - issued_at
    if abs(age) > max_age_s:
        return Verdict(False, f"stale: issued {age:.0f} s ago, limit {max_age_s:.0f} s")
    return Verdict(True, None, key_id, nonce, issued_at)


def bearer_token_matches(authorization: str | None, token: str | SecretStr) -> bool:
    """Whether an HTTP ``Authorization`` header is ``Bearer <token>`` (scheme case-insensitive)."""
    if not authorization:
        return False
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8"), _secret(token))
