"""Admin endpoint and control-topic signatures: who may send a control command, and how.

The HTTP tests talk to a real ``AdminServer`` on an ephemeral loopback port, so status codes,
headers and the size limit are checked on the wire, not on a mocked WSGI call.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from daemon.config import load_settings
from daemon.control.admin import AdminError, AdminServer, ControlInbox, InboxFullError
from daemon.control.auth import (
    ISSUED_AT_HEADER,
    KEY_ID_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    bearer_token_matches,
    sign_control,
    verify_control,
)
from daemon.control.commands import (
    MAX_CONTROL_BYTES,
    Pause,
    Rollback,
    encode_control,
    parse_control,
)
from daemon.errors import SettingsError

TOKEN = "admin-token-0123456789abcdef"
WRONG = "wrong-token-fedcba9876543210"
KEY = "control-key-0123456789abcdef"
KEY2 = "control-key-2-0123456789abcdef"

pytestmark = pytest.mark.timeout(60)


# -- inbox -----------------------------------------------------------------------------------


def test_inbox_hands_commands_to_the_loop_in_order_and_reports_outcomes() -> None:
    inbox = ControlInbox()
    first = inbox.put(Pause(command="pause"), source="test")
    second = inbox.put(Rollback(command="rollback", version=3), source="test")
    assert first != second
    assert inbox.state(first).status == "pending"

    items = inbox.drain()
    assert [i.id for i in items] == [first, second]
    assert [i.command.command for i in items] == ["pause", "rollback"]
    assert items[0].received_at.tzinfo is not None
    assert inbox.drain() == []
    assert inbox.state(second).status == "pending"  # drained, not yet executed

    inbox.complete(first, "done")
    assert inbox.state(first).to_json() == {
        "id": first,
        "status": "done",
        "command": "pause",
        "outcome": "done",
    }
    with pytest.raises(KeyError):
        inbox.complete(first, "done")  # only once
    with pytest.raises(KeyError):
        inbox.complete("0" * 32, "done")
    assert inbox.state("0" * 32) is None


def test_inbox_is_bounded() -> None:
    inbox = ControlInbox(max_pending=2, max_outcomes=1)
    ids = [inbox.put(Pause(command="pause"), "t") for _ in range(2)]
    with pytest.raises(InboxFullError):
        inbox.put(Pause(command="pause"), "t")
    inbox.drain()
    with pytest.raises(InboxFullError):  # drained but not completed still counts
        inbox.put(Pause(command="pause"), "t")
    inbox.complete(ids[0], "done")
    third = inbox.put(Pause(command="pause"), "t")
    inbox.complete(ids[1], "done")
    assert inbox.state(ids[0]) is None  # only the newest outcome is kept
    assert inbox.state(ids[1]).outcome == "done"
    assert inbox.state(third).status == "pending"


def test_inbox_put_is_thread_safe() -> None:
    inbox = ControlInbox(max_pending=10_000)
    drained: list[str] = []
    stop = threading.Event()

    def loop() -> None:  # the daemon's main loop, draining while HTTP threads put
        while not stop.is_set():
            for item in inbox.drain():
                drained.append(item.id)
                inbox.complete(item.id, "done")

    def producer() -> None:
        for _ in range(200):
            inbox.put(Pause(command="pause"), "t")

    consumer = threading.Thread(target=loop)
    consumer.start()
    producers = [threading.Thread(target=producer) for _ in range(8)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    stop.set()
    consumer.join()
    drained += [item.id for item in inbox.drain()]
    assert len(drained) == len(set(drained)) == 1600


# -- HTTP ------------------------------------------------------------------------------------


@pytest.fixture
def inbox() -> ControlInbox:
    return ControlInbox(max_pending=3)


@pytest.fixture
def server(inbox: ControlInbox) -> Iterator[AdminServer]:
    srv = AdminServer(inbox, SecretStr(TOKEN), host="127.0.0.1", port=0).start()
    try:
        yield srv
    finally:
        srv.stop()


def request(
    server: AdminServer,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("token", [None, WRONG, "", TOKEN[:-1]])
def test_missing_or_wrong_token_is_401_and_never_logged(
    server: AdminServer, inbox: ControlInbox, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = request(
        server, "POST", "/control", encode_control(Pause(command="pause")), token
    )
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"] == "unauthorized"
    assert inbox.drain() == []
    refused = [r for r in caplog.records if r.getMessage() == "admin request refused"]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert TOKEN not in caplog.text and WRONG not in caplog.text and TOKEN[:-1] not in caplog.text
    # GET is protected too: outcomes are admin information.
    assert request(server, "GET", f"/control/{'0' * 32}", token=token)[0] == 401


def test_other_auth_schemes_are_refused(server: AdminServer) -> None:
    status, _, _ = request(
        server, "POST", "/control", b'{"command": "pause"}', token=None,
        headers={"Authorization": f"Basic {TOKEN}"},
    )  # fmt: skip
    assert status == 401


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"pause", "invalid-json"),
        (b'{"command": "explode"}', "unknown-command"),
        (b'{"command": "rollback", "version": 0}', "schema-violation"),
        (b'{"command": "pause", "extra": 1}', "schema-violation"),
    ],
)
def test_invalid_body_is_400_with_the_reason(
    server: AdminServer, inbox: ControlInbox, raw: bytes, reason: str
) -> None:
    status, _, body = request(server, "POST", "/control", raw)
    assert status == 400
    assert body["error"] == reason and body["detail"]
    assert inbox.drain() == []


def test_accepted_command_is_202_then_pending_then_its_outcome(
    server: AdminServer, inbox: ControlInbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = encode_control(Rollback(command="rollback", version=4))
    status, headers, body = request(server, "POST", "/control", raw)
    assert status == 202
    item_id = body["id"]
    assert body["status"] == "pending" and headers["Location"] == f"/control/{item_id}"
    assert request(server, "GET", f"/control/{item_id}")[2]["status"] == "pending"

    [item] = inbox.drain()  # what the daemon's loop does between batches
    assert item.id == item_id
    assert item.command == parse_control(raw)
    assert item.source == "admin-http:127.0.0.1"
    assert request(server, "GET", f"/control/{item_id}")[2]["status"] == "pending"
    inbox.complete(item.id, "done: production is version 4")

    status, _, body = request(server, "GET", f"/control/{item_id}")
    assert status == 200
    assert body == {
        "id": item_id,
        "status": "done",
        "command": "rollback",
        "outcome": "done: production is version 4",
    }
    assert TOKEN not in caplog.text


def test_unknown_ids_routes_and_methods(server: AdminServer) -> None:
    assert request(server, "GET", f"/control/{'a' * 32}")[0] == 404
    assert request(server, "GET", "/control/../../etc/passwd")[0] == 404
    assert request(server, "GET", "/metrics")[0] == 404
    status, headers, _ = request(server, "GET", "/control")
    assert status == 405 and headers["Allow"] == "POST"
    assert request(server, "DELETE", f"/control/{'a' * 32}")[0] == 405


def test_full_inbox_is_503(server: AdminServer) -> None:
    for _ in range(3):
        assert request(server, "POST", "/control", b'{"command": "pause"}')[0] == 202
    status, headers, body = request(server, "POST", "/control", b'{"command": "pause"}')
    assert status == 503 and headers["Retry-After"] and body["error"] == "busy"


def raw_exchange(port: int, head: bytes, body: bytes = b"") -> tuple[bytes, float]:
    """Send a hand-written request; return the response and how long it took to arrive."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        began = time.monotonic()
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), time.monotonic() - began


def test_oversized_body_is_refused_before_it_is_read(
    server: AdminServer, inbox: ControlInbox
) -> None:
    # Announce a huge body but send only a few bytes: a server that read the body first
    # would sit waiting for the rest until the request timeout (10 s).
    head = (
        b"POST /control HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
        + f"Content-Length: {MAX_CONTROL_BYTES * 1000}\r\n\r\n".encode()
    )
    response, took_s = raw_exchange(server.port, head, b'{"command":')
    assert response.startswith(b"HTTP/1.0 413") or response.startswith(b"HTTP/1.1 413")
    assert took_s < 5
    assert inbox.drain() == []


def test_body_without_length_is_411(server: AdminServer) -> None:
    head = (
        b"POST /control HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    response, _ = raw_exchange(server.port, head)
    assert b" 411 " in response.split(b"\r\n", 1)[0]


def test_server_needs_a_token_and_a_free_port(inbox: ControlInbox) -> None:
    with pytest.raises(AdminError, match="token"):
        AdminServer(inbox, "", port=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(AdminError, match="cannot listen"):
            AdminServer(inbox, TOKEN, port=taken.getsockname()[1])


def test_admin_settings_defaults_and_from_settings(inbox: ControlInbox, tmp_path) -> None:
    env = {"FACTKEEPER_HOME": str(tmp_path), "FACTKEEPER_ADMIN__PORT": "0"}
    with pytest.raises(SettingsError, match="admin.port"):
        load_settings(None, env=env)  # 0 is not a port to configure
    settings = load_settings(None, env={"FACTKEEPER_HOME": str(tmp_path)})
    assert (settings.admin.host, settings.admin.port) == ("127.0.0.1", 9109)
    with pytest.raises(AdminError, match="admin.token"):
        AdminServer.from_settings(settings.admin, inbox)
    enabled = load_settings(
        None,
        env={
            "FACTKEEPER_HOME": str(tmp_path),
            "FACTKEEPER_ADMIN__ENABLED": "true",
            "FACTKEEPER_ADMIN__TOKEN": TOKEN,
        },
    )
    assert TOKEN not in repr(enabled.admin) and enabled.redacted_dict()["admin"]["token"] == "***"


# -- tokens and signatures -------------------------------------------------------------------


def test_bearer_token_matching() -> None:
    assert bearer_token_matches(f"Bearer {TOKEN}", TOKEN)
    assert bearer_token_matches(f"bearer  {TOKEN} ", SecretStr(TOKEN))
    for header in (None, "", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {WRONG}"):
        assert not bearer_token_matches(header, TOKEN)


SCOPE = {"topic": "factkeeper.control", "group": "factkeeper"}
KEYS = {"k1": SecretStr(KEY), "k2": SecretStr(KEY2)}


def _verify(value, headers, **overrides):
    options = {"keys": KEYS, "max_age_s": 300.0, **SCOPE, **overrides}
    return verify_control(value, headers, **options)


def test_signature_accepts_the_right_one_and_refuses_wrong_or_missing() -> None:
    value = encode_control(Rollback(command="rollback", version=2))
    headers = sign_control(value, key_id="k1", key=KEY, **SCOPE)
    assert {k for k, _ in headers} == {
        SIGNATURE_HEADER,
        KEY_ID_HEADER,
        ISSUED_AT_HEADER,
        NONCE_HEADER,
    }
    assert _verify(value, headers).ok
    assert _verify(value, [("trace-id", b"1"), *headers]).ok
    rotated = sign_control(value, key_id="k2", key=KEY2, **SCOPE)
    assert _verify(value, rotated).ok  # a second key id: rotation

    assert not _verify(value, sign_control(value, key_id="k1", key=WRONG, **SCOPE)).ok
    assert not _verify(value, sign_control(value, key_id="k9", key=KEY, **SCOPE)).ok
    tampered = encode_control(Rollback(command="rollback", version=1))
    assert not _verify(tampered, headers).ok  # value changed after signing
    assert not _verify(value, headers, topic="other.control").ok  # another topic
    assert not _verify(value, headers, group="other-group").ok  # another daemon
    old = sign_control(value, key_id="k1", key=KEY, now=time.time() - 301, **SCOPE)
    assert "stale" in (_verify(value, old).reason or "")
    assert not _verify(value, []).ok
    assert not _verify(value, None).ok
    assert not _verify(value, headers * 2).ok  # ambiguous: two signatures
    assert not _verify(None, headers).ok  # a tombstone is never a command
    with pytest.raises(ValueError):
        sign_control(value, key_id="k1", key="", **SCOPE)


def test_signature_covers_value_scope_time_and_nonce() -> None:
    import hashlib
    import hmac

    value = b'{"command":"pause"}'
    headers = dict(sign_control(value, key_id="k1", key=KEY, now=1_700_000_000, **SCOPE))
    nonce = headers[NONCE_HEADER].decode()
    message = b"\n".join(
        [b"factkeeper-control/v2", b"k1", b"factkeeper.control", b"factkeeper", b"1700000000"]
        + [nonce.encode(), value]
    )
    expected = hmac.new(KEY.encode(), message, hashlib.sha256).hexdigest().encode()
    assert headers[SIGNATURE_HEADER] == expected
    assert headers[ISSUED_AT_HEADER] == b"1700000000" and len(nonce) == 32
