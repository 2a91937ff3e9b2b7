"""Who may send control commands: the admin token, as a bearer token and as an HMAC key.

A control command can roll the model back or revert an edit, so once ``admin.token`` is set
the daemon executes only commands that prove they know it: over HTTP as ``Authorization:
Bearer <token>``, and on the control topic as a ``factkeeper-signature`` header holding the hex
HMAC-SHA256 of the record value under the token. Whoever can merely write to the topic (a
producer of corrections, say) cannot forge that header. Both checks compare in constant time.
The token itself is never logged; callers log only that a check failed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from pydantic import SecretStr

SIGNATURE_HEADER = "factkeeper-signature"
"""Kafka record header carrying ``hex(HMAC-SHA256(token, value))`` as ASCII bytes."""

Headers = Sequence[tuple[str, bytes | None]]


def _key(token: str | SecretStr) -> bytes:
    secret = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not secret:
        raise ValueError("the admin token must not be empty")
    return secret.encode("utf-8")


def control_signature(value: bytes, token: str | SecretStr) -> str:
    """``hex(HMAC-SHA256(token, value))``: the signature of one control record value."""
    return hmac.new(_key(token), bytes(value), hashlib.sha256).hexdigest()


def sign_control(value: bytes, token: str | SecretStr) -> list[tuple[str, bytes]]:
    """Kafka headers that make ``value`` an authenticated control record.

    Usage: ``producer.send(topic, value=raw, headers=sign_control(raw, token))``.
    """
    return [(SIGNATURE_HEADER, control_signature(value, token).encode("ascii"))]


def verify_control(value: bytes | None, headers: Headers | None, token: str | SecretStr) -> bool:
    """True only if ``headers`` hold exactly one signature header and it matches ``value``.

    A missing value, a missing, repeated, non-ASCII or wrong signature are all refusals; the
    comparison takes the same time whichever byte differs.
    """
    if value is None:
        return False
    found = [v for k, v in (headers or ()) if k == SIGNATURE_HEADER]
    if len(found) != 1 or not isinstance(found[0], bytes | bytearray):
        return False
    expected = control_signature(value, token).encode("ascii")
    return hmac.compare_digest(bytes(found[0]).strip().lower(), expected)


def bearer_token_matches(authorization: str | None, token: str | SecretStr) -> bool:
    """Whether an HTTP ``Authorization`` header is ``Bearer <token>`` (scheme case-insensitive)."""
    if not authorization:
        return False
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8"), _key(token))
