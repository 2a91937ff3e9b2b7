"""``/metrics``, ``/healthz`` and ``/readyz`` on one port, served from a daemon thread.

Liveness says the process answers; readiness says it can do its job: the model is loaded and
the consumer has partitions and a broker connection. Kubernetes probes use both.
"""

from __future__ import annotations

import json
import threading
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


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Scrapes every few seconds would drown the daemon's own log lines."""


def make_app(registry: CollectorRegistry, readiness: Readiness) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "alive"})
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

    def __init__(self, registry: CollectorRegistry, readiness: Readiness, host: str, port: int):
        self._server = make_server(
            host, port, make_app(registry, readiness), _ThreadingServer, handler_class=_QuietHandler
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
