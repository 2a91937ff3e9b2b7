"""``/metrics``, ``/healthz`` and ``/readyz`` on one port, served from a daemon thread.

Liveness says the main loop still goes round (a heartbeat, see ``Heartbeat``); readiness says
it can do its job: the model is loaded, the key statistics exist, and the consumer has
partitions and a broker connection (``/readyz`` says why not). Kubernetes probes use both.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class Readiness:
    """Named conditions that must all hold before the daemon reports ready, each with an
    optional reason while it does not (``/readyz`` shows why a start takes long)."""

    def __init__(self, *conditions: str) -> None:
        self._lock = threading.Lock()
        self._state = dict.fromkeys(conditions, False)
        self._reasons: dict[str, str] = {}

    def set(self, condition: str, ok: bool, reason: str | None = None) -> None:
        """Set a condition; ``reason`` says why it does not hold yet (dropped once it holds)."""
        with self._lock:
            self._state[condition] = ok
            if ok or reason is None:
                self._reasons.pop(condition, None)
            else:
                self._reasons[condition] = reason

    def snapshot(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._state)

    def reasons(self) -> dict[str, str]:
        """Why each unmet condition is unmet, where the daemon said."""
        with self._lock:
            return {c: r for c, r in self._reasons.items() if not self._state.get(c, False)}

    @property
    def ready(self) -> bool:
        return all(self.snapshot().values())


class Heartbeat:
    """When the daemon's main loop last went round, for ``/healthz``.

    A loop stuck in a hung call (a dead broker connection, a deadlock) used to leave
    ``/healthz`` answering "alive" forever. Once ``arm``ed (the loop started; model loading and
    journal replay before it are the startup probe's business), a heartbeat older than
    ``max_age_s`` makes ``/healthz`` answer 503 so Kubernetes restarts the pod. ``max_age_s``
    must exceed the longest batch, snapshot or audit, which run inside one beat.
    """

    def __init__(self, max_age_s: float) -> None:
        if max_age_s <= 0:
            raise ValueError("max_age_s must be positive")
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._armed = False

    def arm(self) -> None:
        """Start checking (the main loop is about to run); counts as a beat."""
        with self._lock:
            self._armed = True
            self._last = time.monotonic()

    def beat(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def state(self) -> tuple[bool, float]:
        """(fresh, seconds since the last beat); always fresh before ``arm``."""
        with self._lock:
            age = time.monotonic() - self._last
            return (not self._armed or age <= self.max_age_s), age


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Scrapes every few seconds would drown the daemon's own log lines."""


def make_app(
    registry: CollectorRegistry, readiness: Readiness, heartbeat: Heartbeat | None = None
) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            if heartbeat is None:
                return _json(start_response, "200 OK", {"status": "alive"})
            fresh, age = heartbeat.state()
            body = {
                "status": "alive" if fresh else "stale",
                "heartbeat_age_seconds": round(age, 3),
                "max_age_seconds": heartbeat.max_age_s,
            }
            return _json(start_response, "200 OK" if fresh else "503 Service Unavailable", body)
        if path == "/readyz":
            state = readiness.snapshot()
            ok = all(state.values())
            status = "200 OK" if ok else "503 Service Unavailable"
            body = {"ready": ok, "conditions": state, "reasons": readiness.reasons()}
            return _json(start_response, status, body)
        if path == "/metrics":
            return metrics_app(environ, start_response)
        return _json(start_response, "404 Not Found", {"error": f"no route {path}"})

    return app


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]


class MetricsServer:
    """The HTTP endpoint; ``start`` returns at once, ``stop`` shuts it down (at SIGTERM)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Readiness,
        host: str,
        port: int,
        heartbeat: Heartbeat | None = None,
    ):
        self._server = make_server(
            host,
            port,
            make_app(registry, readiness, heartbeat),
            _ThreadingServer,
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return self._server.server_port

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
