"""A closed-loop raw-UDP CoAP load generator: one connected socket per concurrent request.

Each worker owns a socket and keeps exactly one CON request outstanding; many sockets mean
many source ports, so SO_REUSEPORT spreads them over server workers. The generator's own
CPU time is measured, so a run shows whether the client was the bottleneck.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from bench import coap_wire as wire

# A socket stops taking new requests well before its 16-bit message ids wrap: aiocoap
# remembers (remote, mid) for EXCHANGE_LIFETIME (247 s) and would answer a reused mid from
# its duplicate cache. Retired sockets stay open so their port is not handed out again.
MAX_MESSAGES_PER_SOCKET = 30_000
REQUEST_TIMEOUT = 5.0


class Endpoint(asyncio.DatagramProtocol):
    """One client socket, connected to the server; responses are matched by message token."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, asyncio.Future[wire.Response]] = {}
        self.sent = 0
        self._mid = random.randrange(0x10000)
        self._tokens = itertools.count(random.randrange(1 << 48))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            message = wire.decode(data)
        except (ValueError, IndexError):
            return
        if message.mtype == wire.CON:
            self.transport.sendto(wire.empty_ack(message.mid))  # type: ignore[union-attr]
        if message.code == 0:
            return  # an empty ACK: a separate response follows
        future = self.waiting.pop(message.token, None)
        if future is not None and not future.done():
            future.set_result(message)

    def error_received(self, exc: Exception) -> None:
        pass

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        self.sent += 1
        return self._mid

    def next_token(self) -> bytes:
        return next(self._tokens).to_bytes(wire.TOKEN_LENGTH, "big")

    async def exchange(
        self, code: int, options: bytes, payload: bytes = b"", timeout: float = REQUEST_TIMEOUT
    ) -> wire.Response:
        """Send one CON request and wait for its response (piggybacked or separate)."""
        token = self.next_token()
        future: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        assert self.transport is not None
        self.transport.sendto(wire.encode(wire.CON, code, self.next_mid(), token, options, payload))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(token, None)


class EndpointPool:
    """Client sockets towards one server address, reused across phases, never closed early."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._live: list[Endpoint] = []
        self._all: list[asyncio.DatagramTransport] = []

    async def _open(self) -> Endpoint:
        loop = asyncio.get_running_loop()
        transport, endpoint = await loop.create_datagram_endpoint(
            Endpoint, remote_addr=(self.host, self.port)
        )
        self._all.append(transport)
        return endpoint

    async def take(self, count: int) -> list[Endpoint]:
        """`count` fresh-enough sockets: the least used first, new ones when needed."""
        self._live = [e for e in self._live if e.sent < MAX_MESSAGES_PER_SOCKET]
        while len(self._live) < count:
            self._live.append(await self._open())
        self._live.sort(key=lambda e: e.sent)
        return self._live[:count]

    def close(self) -> None:
        for transport in self._all:
            transport.close()


@dataclass
class Workload:
    """What a worker sends: `build(state)` gives (code, options, payload); `accept(state,
    response)` says whether the response is the expected success (and updates the state);
    `prepare(endpoint, state)` runs once per worker before its loop (not timed)."""

    name: str
    build: Callable[[dict[str, Any]], tuple[int, bytes, bytes]]
    accept: Callable[[dict[str, Any], wire.Response], bool]
    prepare: Callable[[Endpoint, dict[str, Any]], Awaitable[None]] | None = None


@dataclass
class PhaseResult:
    workload: str
    concurrency: int
    duration: float
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0  # seconds of this process's CPU during the phase
    server_cpu: float = 0.0  # seconds of the server processes' CPU
    database_cpu: float = 0.0  # seconds of the database server's CPU (PostgreSQL), if measured
    machine_cpu: float = 0.0  # busy CPU seconds of the whole machine, every process

    @property
    def other_cpu(self) -> float:
        """CPU seconds used by neither the servers, nor their database, nor this load
        generator: other load."""
        used = self.server_cpu + self.database_cpu + self.client_cpu
        return max(0.0, self.machine_cpu - used)

    @property
    def rate(self) -> float:
        return self.ok / self.duration if self.duration else 0.0

    def merge(self, other: PhaseResult) -> None:
        self.duration += other.duration
        self.ok += other.ok
        self.errors += other.errors
        self.latencies += other.latencies
        self.client_cpu += other.client_cpu
        self.server_cpu += other.server_cpu
        self.database_cpu += other.database_cpu
        self.machine_cpu += other.machine_cpu

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_closed_loop(
    endpoints: list[Endpoint],
    workload: Workload,
    duration: float,
    warmup: float,
    server_cpu: Callable[[], float] = lambda: 0.0,
    machine_cpu: Callable[[], float] = lambda: 0.0,
    database_cpu: Callable[[], float] = lambda: 0.0,
) -> PhaseResult:
    """Every endpoint runs one worker; only responses that arrive inside the measured
    window (after the warm-up) count. `server_cpu()` reads the servers' CPU seconds,
    `machine_cpu()` the whole machine's busy CPU seconds, `database_cpu()` the database
    server's."""
    states: list[dict[str, Any]] = [{} for _ in endpoints]
    if workload.prepare is not None:
        await asyncio.gather(
            *(workload.prepare(e, s) for e, s in zip(endpoints, states, strict=True))
        )
    result = PhaseResult(workload.name, len(endpoints), duration)
    start = time.perf_counter()
    measured_from = start + warmup
    end = measured_from + duration
    cpu_at_window: list[tuple[float, float, float, float]] = []

    async def worker(endpoint: Endpoint, state: dict[str, Any]) -> None:
        while True:
            sent_at = time.perf_counter()
            if sent_at >= end:
                return
            code, options, payload = workload.build(state)
            try:
                response = await endpoint.exchange(code, options, payload)
                good = workload.accept(state, response)
            except TimeoutError:
                good = False
            done_at = time.perf_counter()
            if measured_from <= sent_at and done_at <= end:
                if good:
                    result.ok += 1
                    result.latencies.append(done_at - sent_at)
                else:
                    result.errors += 1
            if not good and workload.prepare is not None:
                await workload.prepare(endpoint, state)

    async def cpu_marker() -> None:
        await asyncio.sleep(warmup)
        cpu_at_window.append((time.process_time(), server_cpu(), machine_cpu(), database_cpu()))
        await asyncio.sleep(duration)
        cpu_at_window.append((time.process_time(), server_cpu(), machine_cpu(), database_cpu()))

    await asyncio.gather(
        cpu_marker(), *(worker(e, s) for e, s in zip(endpoints, states, strict=True))
    )
    result.client_cpu = cpu_at_window[1][0] - cpu_at_window[0][0]
    result.server_cpu = cpu_at_window[1][1] - cpu_at_window[0][1]
    result.machine_cpu = cpu_at_window[1][2] - cpu_at_window[0][2]
    result.database_cpu = cpu_at_window[1][3] - cpu_at_window[0][3]
    return result


# -- the workloads of the token endpoint ----------------------------------------------------

TOKEN_OPTIONS = wire.request_options("/token", content_format=19)


def token_request(
    client_id: str, secret: str, audience: str, extra: dict[Any, Any] | None = None
) -> bytes:
    return cbor2.dumps({24: client_id, 25: secret, 5: audience, **(extra or {})})


def issue_workload(client_id: str, secret: str, audience: str) -> Workload:
    payload = token_request(client_id, secret, audience)
    return Workload(
        "issue",
        build=lambda state: (wire.POST, TOKEN_OPTIONS, payload),
        accept=lambda state, response: response.code == wire.CREATED,
    )


def noop_workload(client_id: str, secret: str, audience: str) -> Workload:
    """The same request bytes to the bench-only /noop resource of the same server."""
    return _same_request("no-op", "/noop", token_request(client_id, secret, audience))


def floor_workload(client_id: str, secret: str, audience: str) -> Workload:
    """The same request bytes to the bench-only /floor resource (a signature and a durable
    row, nothing else)."""
    return _same_request("floor", "/floor", token_request(client_id, secret, audience))


def _same_request(name: str, path: str, payload: bytes) -> Workload:
    """A /token request's bytes POSTed to `path`, answered 2.01."""
    options = wire.request_options(path, content_format=19)
    return Workload(
        name,
        build=lambda state: (wire.POST, options, payload),
        accept=lambda state, response: response.code == wire.CREATED,
    )


def refresh_workload(client_id: str, secret: str, audience: str) -> Workload:
    """Each worker holds one refresh family and always sends its newest refresh token."""
    grant = token_request(client_id, secret, audience)

    async def prepare(endpoint: Endpoint, state: dict[str, Any]) -> None:
        for _ in range(5):
            try:
                response = await endpoint.exchange(wire.POST, TOKEN_OPTIONS, grant)
            except TimeoutError:
                continue
            if response.code == wire.CREATED:
                state["refresh_token"] = cbor2.loads(response.payload)[37]
                return
        raise RuntimeError("could not obtain a refresh token to start the refresh workload")

    def build(state: dict[str, Any]) -> tuple[int, bytes, bytes]:
        body = {33: 3, 37: state["refresh_token"], 24: client_id, 25: secret}
        return wire.POST, TOKEN_OPTIONS, cbor2.dumps(body)

    def accept(state: dict[str, Any], response: wire.Response) -> bool:
        if response.code != wire.CREATED:
            return False
        state["refresh_token"] = cbor2.loads(response.payload)[37]
        return True

    return Workload("refresh", build=build, accept=accept, prepare=prepare)


def keys_workload() -> Workload:
    options = wire.request_options("/keys")
    return Workload(
        "GET /keys",
        build=lambda state: (wire.GET, options, b""),
        accept=lambda state, response: response.code == wire.CONTENT,
    )
