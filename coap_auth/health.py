"""The HTTP listener beside the CoAP server: Prometheus metrics at /metrics and the health
check at /healthz, on `metrics_bind`:`metrics_port` (off while the port is 0).

It runs prometheus_client's threaded WSGI server in its own thread, so it never reads the
store or the key rings: /healthz judges a snapshot (`HealthSnapshot`) the event loop keeps.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from coap_auth.errors import OperatorError
from coap_auth.metrics import Metrics

log = logging.getLogger("coap_auth.server")

# /healthz fails when the store failed this recently (s) ...
STORE_ERROR_WINDOW = 30
# ... or has not answered for this long (s; the server asks it every change-poll interval).
STORE_SILENCE_LIMIT = 60

Environ = dict[str, Any]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass(slots=True)
class HealthSnapshot:
    """What /healthz judges, kept by the event loop: whether the default family has an
    active signing key (set on every tick), and when the store last answered and failed
    (set by the measuring store proxy, in `metrics`)."""

    metrics: Metrics
    now: Callable[[], int]
    silence_limit: float = STORE_SILENCE_LIMIT
    active_key: bool = False

    def problems(self) -> list[str]:
        """Why the service is not healthy; [] when it is."""
        now = self.now()
        problems = []
        failed, answered = self.metrics.store_failed_at, self.metrics.store_answered_at
        if failed is not None and now - failed < STORE_ERROR_WINDOW:
            problems.append(f"store failed {now - failed} s ago")
        if answered is None:
            problems.append("store has not answered yet")
        elif now - answered > self.silence_limit:
            problems.append(f"store has not answered for {now - answered} s")
        if not self.active_key:
            problems.append("no active signing key")
        return problems

    def body(self) -> tuple[bool, bytes]:
        problems = self.problems()
        answered = self.metrics.store_answered_at
        document = {
            "status": "unavailable" if problems else "ok",
            "problems": problems,
            "store_answered_ago": None if answered is None else self.now() - answered,
            "active_signing_key": self.active_key,
        }
        return not problems, json.dumps(document).encode() + b"\n"


def monitoring_app(metrics: Metrics, health: HealthSnapshot) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: /metrics (prometheus_client's own app), /healthz, and 404 elsewhere."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return prometheus(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz" and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            healthy, body = health.body()
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: /metrics and /healthz are served here\n"]

    return app


class MonitoringListener:
    """The listener's thread: `start()` binds (OperatorError naming address:port when it
    cannot), `stop()` shuts it down and closes the socket."""

    def __init__(self, metrics: Metrics, health: HealthSnapshot, bind: str, port: int) -> None:
        self.app = monitoring_app(metrics, health)
        self.bind = bind
        self.requested_port = port
        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        where = f"{self.bind}:{self.requested_port}"
        try:
            family = _family(self.bind)

            class Listener(ThreadingWSGIServer):
                address_family = family

            server = make_server(
                self.bind, self.requested_port, self.app, Listener, handler_class=_QuietHandler
            )
        except OSError as error:
            reason = error.strerror or str(error)
            raise OperatorError(f"cannot listen for metrics on {where}: {reason}") from None
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, name="coap-auth-metrics", daemon=True
        )
        self._thread.start()
        if not _is_loopback(self.bind):
            log.warning(
                "metrics and /healthz listen on %s, beyond this host: they tell request "
                "rates, error counts and key events to whoever can reach it",
                self.url,
            )
        log.info("metrics at %s/metrics, health at %s/healthz", self.url, self.url)

    def stop(self) -> None:
        """Blocks until the serving thread ends (up to its half-second poll)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _family(bind: str) -> Any:
    infos = socket.getaddrinfo(bind, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def _is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape (wsgiref logs every request there by default)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
