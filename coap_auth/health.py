"""The HTTP listener beside the CoAP server: Prometheus metrics at /metrics and the health
check at /healthz, on `metrics_bind`:`metrics_port` (off while the port is 0).

It never reads the store or the key rings: /healthz judges a snapshot (`HealthSnapshot`) the
event loop keeps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coap_auth.addresses import authority
from coap_auth.errors import OperatorError
from coap_auth.metrics import Metrics

log = logging.getLogger("coap_auth.server")

# /healthz fails when the store failed this recently (s) ...
STORE_ERROR_WINDOW = 30
# ... or has not answered for this long (s; the server asks it every change-poll interval).
STORE_SILENCE_LIMIT = 60

# The HTTP listener's bounds (see MonitoringListener).
REQUEST_LIMIT = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0  # s to send them, and to take the answer
MAX_CONNECTIONS = 64
EXPOSITION_REUSE = 1.0  # s a /metrics text is served again before it is made anew


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


class MonitoringListener:
    """/metrics and /healthz over HTTP/1.1, on the event loop: `start()` binds (OperatorError
    naming address:port when it cannot), `stop()` closes it.

    Served by hand, GET and HEAD of two paths only, because the stdlib's servers were the
    weak part (attack round 1 of issue 18): wsgiref kept up to 100 header lines of 64 KiB
    per connection (10 connections: +300 MB) and a thread per idle connection without a
    time limit. Here a request's line and headers are at most REQUEST_LIMIT bytes and must
    arrive within REQUEST_TIMEOUT s, and at most MAX_CONNECTIONS are open at once (past
    that, the oldest still sending its head is closed). asyncio backs off by itself when accept()
    runs out of file descriptors."""

    def __init__(self, metrics: Metrics, health: HealthSnapshot, bind: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        self.bind = bind
        self.requested_port = port
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        # Connections still sending their head, oldest first: the ones a new one displaces.
        self._reading: dict[asyncio.StreamWriter, None] = {}
        self._open = 0
        self._exposition: tuple[float, bytes] | None = None  # (when made, the text)

    @property
    def url(self) -> str:
        return f"http://{authority(self.bind, self.port)}"

    @property
    def addresses(self) -> list[str]:
        """The addresses its sockets are bound to."""
        assert self._server is not None, "not started"
        return [sock.getsockname()[0] for sock in self._server.sockets]

    async def start(self) -> None:
        where = f"{self.bind}:{self.requested_port}"
        try:
            self._server = await asyncio.start_server(
                self._connection, self.bind, self.requested_port, limit=REQUEST_LIMIT
            )
        except OSError as error:
            # asyncio rewords the system's message around the address; the system's alone.
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise OperatorError(f"cannot listen for metrics on {where}: {reason}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        if not _is_loopback(self.bind):
            log.warning(
                "metrics and /healthz listen on %s, beyond this host: they tell request "
                "rates, error counts and key events to whoever can reach it",
                self.url,
            )
        log.info("metrics at %s/metrics, health at %s/healthz", self.url, self.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            if not self._reading:  # all of them being answered: they end soon
                writer.close()
                return
            # The oldest that has not sent its head yet gives way: a flood of idle
            # connections cannot keep a scrape out (attack round 2), it can only race it.
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            oldest.close()
        self._open += 1
        self._reading[writer] = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            self._reading.pop(writer, None)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            status, content_type, body = self._answer(method, path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                + (b"" if method == b"HEAD" else body)
            )
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass  # too long, too slow, or gone: closed without an answer
        finally:
            self._reading.pop(writer, None)
            self._open -= 1
            writer.close()

    def _metrics_text(self) -> bytes:
        """The exposition, made at most once per EXPOSITION_REUSE s: it runs on the event
        loop, and 32 scrapers in a loop made CoAP answers 20 times slower (attack round 2)."""
        now = asyncio.get_running_loop().time()
        if self._exposition is None or now - self._exposition[0] >= EXPOSITION_REUSE:
            self._exposition = (now, generate_latest(self.metrics.registry))
        return self._exposition[1]

    def _answer(self, method: bytes, path: bytes) -> tuple[str, str, bytes]:
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD\n"
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics_text()
        if path == b"/healthz":
            healthy, body = self.health.body()
            return ("200 OK" if healthy else "503 Service Unavailable"), "application/json", body
        return "404 Not Found", "text/plain", b"not found: /metrics and /healthz are served here\n"


def _is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False
