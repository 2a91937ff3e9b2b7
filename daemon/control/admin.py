"""The admin HTTP endpoint: authenticated control commands into the daemon's main loop.

``POST /control`` takes one control command (the same JSON as on the control topic) behind
``Authorization: Bearer <admin.token>`` and answers ``202 {"id": ...}``; ``GET /control/<id>``
reports ``pending`` until the daemon has executed it, then its outcome. The HTTP threads never
touch the model or the journal: they only put validated commands into a ``ControlInbox``, which
the daemon's single-threaded loop drains between batches, exactly where it handles the control
topic. Served like ``monitoring/http.py``: a WSGI app on wsgiref's server in a daemon thread,
bound to 127.0.0.1 by default.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from pydantic import SecretStr

from daemon.config import AdminSettings
from daemon.control.auth import bearer_token_matches
from daemon.control.commands import MAX_CONTROL_BYTES, ControlCommand, parse_control
from daemon.errors import DaemonError, InvalidControlError

log = logging.getLogger(__name__)

MAX_PENDING = 64
"""Commands waiting for the main loop; beyond this the endpoint answers 503."""
MAX_OUTCOMES = 1024
"""Finished commands whose outcome ``GET /control/<id>`` can still report (oldest dropped)."""
REQUEST_TIMEOUT_S = 10.0
"""A client that sends its request slower than this is disconnected."""
_ID_CHARS = frozenset("0123456789abcdef")

Status = Literal["pending", "done"]


class AdminError(DaemonError):
    """The admin endpoint cannot start, or the inbox refused a command."""


class InboxFullError(AdminError):
    """``MAX_PENDING`` commands are already waiting for the main loop."""


@dataclass(frozen=True)
class InboxItem:
    """One accepted command, waiting for the main loop."""

    id: str
    command: ControlCommand
    source: str
    """Where it came from, e.g. ``admin-http:127.0.0.1``; journaled with the command."""
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class CommandState:
    """What ``GET /control/<id>`` reports."""

    id: str
    status: Status
    command: str
    outcome: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "status": self.status, "command": self.command}
        if self.outcome is not None:
            body["outcome"] = self.outcome
        return body


class ControlInbox:
    """Thread-safe hand-off from the HTTP threads to the daemon's single-threaded loop.

    ``put`` (any thread) queues a validated command and returns its id; ``drain`` (main loop,
    between batches) takes every queued command in arrival order; ``complete`` (main loop)
    records the outcome, which ``state`` then reports. Both queues are bounded.
    """

    def __init__(self, max_pending: int = MAX_PENDING, max_outcomes: int = MAX_OUTCOMES) -> None:
        if max_pending < 1 or max_outcomes < 1:
            raise ValueError("max_pending and max_outcomes must be positive")
        self._lock = threading.Lock()
        self._queued: list[InboxItem] = []
        self._states: OrderedDict[str, CommandState] = OrderedDict()
        self._in_flight = 0  # queued or drained, not yet completed
        self._max_pending = max_pending
        self._max_outcomes = max_outcomes

    def put(self, command: ControlCommand, source: str) -> str:
        """Queue ``command``; return its id (32 hex characters).

        Raises:
            InboxFullError: ``max_pending`` commands are queued or executing.
        """
        with self._lock:
            if self._in_flight >= self._max_pending:
                raise InboxFullError(
                    f"{self._in_flight} control commands are already waiting for the daemon; "
                    "retry once they have run"
                )
            item = InboxItem(id=uuid.uuid4().hex, command=command, source=source)
            self._queued.append(item)
            self._states[item.id] = CommandState(item.id, "pending", command.command)
            self._in_flight += 1
            return item.id

    def drain(self) -> list[InboxItem]:
        """Every queued command, oldest first; they stay ``pending`` until ``complete``."""
        with self._lock:
            items, self._queued = self._queued, []
            return items

    def complete(self, item_id: str, outcome: str) -> None:
        """Record what the daemon did with a drained command (e.g. ``done``).

        Raises:
            KeyError: ``item_id`` is not a pending command of this inbox.
        """
        with self._lock:
            state = self._states.get(item_id)
            if state is None or state.status != "pending":
                raise KeyError(f"no pending control command with id {item_id!r}")
            self._states[item_id] = CommandState(item_id, "done", state.command, outcome)
            self._states.move_to_end(item_id)
            self._in_flight -= 1
            self._forget_old()

    def state(self, item_id: str) -> CommandState | None:
        """The command's state, or None if unknown (never seen, or its outcome was dropped)."""
        with self._lock:
            return self._states.get(item_id)

    def _forget_old(self) -> None:
        finished = [k for k, s in self._states.items() if s.status == "done"]
        for key in finished[: max(0, len(finished) - self._max_outcomes)]:
            del self._states[key]


# -- HTTP ----------------------------------------------------------------------------------------

StartResponse = Callable[..., Any]


def make_app(
    inbox: ControlInbox, token: str | SecretStr
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI app: authentication first, then the size limit, then validation."""
    if not (token.get_secret_value() if isinstance(token, SecretStr) else token):
        raise AdminError("the admin endpoint needs a token (admin.token)")

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        remote = environ.get("REMOTE_ADDR", "?")
        if path != "/control" and not path.startswith("/control/"):
            return _json(start_response, "404 Not Found", {"error": "not-found"})
        if not bearer_token_matches(environ.get("HTTP_AUTHORIZATION"), token):
            reason = "no bearer token" if not environ.get("HTTP_AUTHORIZATION") else "bad token"
            log.warning(
                "admin request refused",
                extra={"reason": reason, "method": method, "path": path, "remote": remote},
            )
            return _json(
                start_response,
                "401 Unauthorized",
                {"error": "unauthorized", "detail": "send Authorization: Bearer <admin token>"},
                [("WWW-Authenticate", 'Bearer realm="factkeeper-admin"')],
            )
        if path == "/control":
            if method != "POST":
                return _json(
                    start_response,
                    "405 Method Not Allowed",
                    {"error": "use POST"},
                    [("Allow", "POST")],
                )
            return _submit(environ, start_response, inbox, remote)
        if method != "GET":
            return _json(
                start_response, "405 Method Not Allowed", {"error": "use GET"}, [("Allow", "GET")]
            )
        return _report(start_response, inbox, path.removeprefix("/control/"))

    return app


def _submit(
    environ: dict[str, Any], start_response: StartResponse, inbox: ControlInbox, remote: str
) -> list[bytes]:
    raw_length = environ.get("CONTENT_LENGTH") or ""
    if not raw_length.isdigit():
        return _json(
            start_response,
            "411 Length Required",
            {"error": "length-required", "detail": "send a Content-Length header"},
        )
    length = int(raw_length)
    if length > MAX_CONTROL_BYTES:  # refused before a single byte of the body is read
        log.warning("admin request refused", extra={"reason": "too-large", "remote": remote})
        return _json(
            start_response,
            "413 Content Too Large",
            {"error": "too-large", "detail": f"at most {MAX_CONTROL_BYTES} bytes"},
        )
    body = environ["wsgi.input"].read(length)
    try:
        command = parse_control(body)
    except InvalidControlError as exc:
        log.warning(
            "admin control command invalid", extra={"reason": exc.reason_code, "remote": remote}
        )
        return _json(
            start_response, "400 Bad Request", {"error": exc.reason_code, "detail": exc.detail}
        )
    try:
        item_id = inbox.put(command, source=f"admin-http:{remote}")
    except InboxFullError as exc:
        log.warning("admin control command refused", extra={"reason": "inbox-full"})
        return _json(
            start_response,
            "503 Service Unavailable",
            {"error": "busy", "detail": str(exc)},
            [("Retry-After", "5")],
        )
    log.info(
        "admin control command accepted",
        extra={"id": item_id, "command": command.command, "remote": remote},
    )
    return _json(
        start_response,
        "202 Accepted",
        {"id": item_id, "status": "pending"},
        [("Location", f"/control/{item_id}")],
    )


def _report(start_response: StartResponse, inbox: ControlInbox, item_id: str) -> list[bytes]:
    state = inbox.state(item_id) if set(item_id) <= _ID_CHARS and item_id else None
    if state is None:
        return _json(start_response, "404 Not Found", {"error": "unknown-id"})
    return _json(start_response, "200 OK", state.to_json())


def _json(
    start_response: StartResponse,
    status: str,
    body: dict[str, Any],
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
            *(headers or []),
        ],
    )
    return [payload]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # a stalled client cannot hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """The app logs each decision itself, without headers (the token travels in one)."""


class AdminServer:
    """The admin endpoint; ``start`` returns at once, ``stop`` shuts it down (at SIGTERM)."""

    def __init__(
        self, inbox: ControlInbox, token: str | SecretStr, host: str = "127.0.0.1", port: int = 9109
    ) -> None:
        try:
            self._server = make_server(
                host, port, make_app(inbox, token), _ThreadingServer, handler_class=_Handler
            )
        except OSError as exc:
            raise AdminError(
                f"the admin endpoint cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "choose another admin.port or stop what listens there"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long ``stop`` may wait for the loop
            name="admin-http",
            daemon=True,
        )

    @classmethod
    def from_settings(cls, admin: AdminSettings, inbox: ControlInbox) -> AdminServer:
        """Build from ``settings.admin``; the caller checks ``admin.enabled`` first.

        Raises:
            AdminError: no token is configured, or the port is taken.
        """
        if admin.token is None:
            raise AdminError("admin.enabled needs admin.token (FACTKEEPER_ADMIN__TOKEN)")
        return cls(inbox, admin.token, admin.host, admin.port)

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return self._server.server_port

    def start(self) -> AdminServer:
        self._thread.start()
        log.info(
            "admin endpoint listening",
            extra={"host": self._server.server_address[0], "port": self.port},
        )
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
