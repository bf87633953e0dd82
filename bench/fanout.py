"""Observe fan-out: many raw-UDP observers of one resource, one change, time to the last one.

Every observer is its own socket bound to its own loopback address (127.1.x.y; all of
127.0.0.0/8 is local on Linux), as a device has its own address: the server's per-source
limit on observations (`observers_per_source`) never applies, and its per-source state is
what many devices would cost. An observer registers with a CON GET carrying Observe 0 and its
own message token (repeated with the Echo value if the server asks, RFC 9175 §2.4), ACKs
every CON it receives, and takes a notification as the new state when its ETag (or, without
one, its payload) differs from what it held before the change. A block-wise notification
(RFC 7959 §2.6: the first block, Block2 with M set) counts once the client has fetched the
remaining blocks with plain GETs, as a device must to hold the new representation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench import coap_wire as wire
from bench.processes import socket_drops, udp_receive_drops

REGISTER_WINDOW = 200  # registrations in flight at once
REGISTER_TRIES = 5
BLOCK_RETRY = 2.0  # s before a block fetch is sent again (RFC 7252 ACK_TIMEOUT)


def loopback_addresses(per_address: int = 1, second_octet: int = 1) -> Iterator[str]:
    """Source addresses 127.<second_octet>.x.y, each handed out `per_address` times (skipping
    .0 and .255 so that no address looks like a network or broadcast address)."""
    for high in range(256):
        for low in range(1, 255):
            for _ in range(per_address):
                yield f"127.{second_octet}.{high}.{low}"
    raise RuntimeError("out of loopback addresses")


class Observer(asyncio.DatagramProtocol):
    def __init__(self, group: ObserverGroup, query: tuple[str, ...]) -> None:
        self.group = group
        self.query = query
        self.transport: asyncio.DatagramTransport | None = None
        self.token = random.randbytes(wire.TOKEN_LENGTH)
        self.block_token = random.randbytes(wire.TOKEN_LENGTH)
        self._mid = random.randrange(0x10000)
        self.answer: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        self.observing = False  # the registration was answered with Observe
        self.registered = False
        self.etag: bytes | None = None  # of the state held
        self.payload = b""
        self.held_before: tuple[bytes | None, bytes] = (None, b"")  # at arm()
        self.notified_at: float | None = None  # the new state complete (all blocks)
        self.first_block_at: float | None = None
        self.size = 0  # bytes of the new representation
        self.blocks = 0
        self._fetch: bytes | None = None  # the block request waiting for its answer
        self._retry: asyncio.TimerHandle | None = None

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        pass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            message = wire.decode(data)
        except (ValueError, IndexError):
            return
        if message.mtype == wire.CON:
            self.transport.sendto(wire.empty_ack(message.mid))  # type: ignore[union-attr]
        if message.code == 0:
            return  # an empty ACK (or a ping)
        if message.token == self.block_token:
            self._block_received(message)
        elif message.token == self.token:
            if not self.registered:
                if not self.answer.done():
                    self.answer.set_result(message)
            elif message.code == wire.CONTENT:
                self._notification(message)

    def _notification(self, message: wire.Response) -> None:
        group = self.group
        group.notifications[message.mtype] = group.notifications.get(message.mtype, 0) + 1
        etag = message.options.get(wire.ETAG)
        if etag is not None and etag == self.etag:
            return
        if etag is None and message.payload == self.payload and wire.BLOCK2 not in message.options:
            return
        self.etag, self.payload = etag, message.payload
        if not group.armed or self.notified_at is not None:
            return
        if (etag, message.payload) == self.held_before:
            return
        self.first_block_at = time.monotonic()
        group.first_blocks += 1
        if group.first_blocks == len(group.observers):
            group.cpu_at_first_blocks = group.server_cpu()
        self.size = len(message.payload)
        block = message.options.get(wire.BLOCK2)
        if block is not None:
            num, more, size = wire.parse_block(block)
            if more and group.fetch_spread:
                delay = random.uniform(0, group.fetch_spread)
                asyncio.get_running_loop().call_later(delay, self._fetch_block, num + 1, size)
                return
            if more:
                self._fetch_block(num + 1, size)
                return
        self._complete()

    def _fetch_block(self, num: int, size: int) -> None:
        options = wire.request_options(
            self.group.path, query=self.query, block2=wire.block2_value(num, False, size)
        )
        self._fetch = wire.encode(
            wire.CON, wire.GET, self.next_mid(), self.block_token, options, b""
        )
        self._send_fetch()

    def _send_fetch(self) -> None:
        if self._fetch is None or self.transport is None:
            return
        self.transport.sendto(self._fetch)  # a retransmission keeps its message id
        self._retry = asyncio.get_running_loop().call_later(BLOCK_RETRY, self._send_fetch)

    def _block_received(self, message: wire.Response) -> None:
        if self._fetch is None:
            return
        self._fetch = None
        if self._retry is not None:
            self._retry.cancel()
        if message.code != wire.CONTENT:
            self.group.block_errors += 1
            return
        self.size += len(message.payload)
        self.blocks += 1
        self.group.block_fetches += 1
        block = message.options.get(wire.BLOCK2)
        if block is not None:
            num, more, size = wire.parse_block(block)
            if more:
                self._fetch_block(num + 1, size)
                return
        self._complete()

    def _complete(self) -> None:
        group = self.group
        self.notified_at = time.monotonic()
        group.notified += 1
        if group.notified == len(group.observers):
            group.all_notified.set()

    async def register(self) -> None:
        """Register (answering an Echo challenge once); raises RuntimeError when the server
        does not answer or refuses."""
        assert self.transport is not None
        echo: bytes | None = None
        for _ in range(2):
            options = wire.request_options(
                self.group.path, observe=True, query=self.query, echo=echo
            )
            request = wire.encode(wire.CON, wire.GET, self.next_mid(), self.token, options, b"")
            answer = await self._exchange(request)
            if answer.code == wire.UNAUTHORIZED and wire.ECHO in answer.options:
                echo = answer.options[wire.ECHO]
                self.group.echo_challenges += 1
                continue
            if answer.code != wire.CONTENT:
                raise RuntimeError(
                    f"registration on {self.group.path} answered {wire.code_text(answer.code)}"
                )
            self.observing = wire.OBSERVE in answer.options
            self.etag, self.payload = answer.options.get(wire.ETAG), answer.payload
            self.registered = True
            return
        raise RuntimeError(f"registration on {self.group.path}: Echo challenged twice")

    async def _exchange(self, request: bytes) -> wire.Response:
        assert self.transport is not None
        for attempt in range(REGISTER_TRIES):
            if self.answer.done():
                self.answer = asyncio.get_running_loop().create_future()
            self.transport.sendto(request)  # a retransmission keeps its message id
            try:
                return await asyncio.wait_for(asyncio.shield(self.answer), 2.0 * 2**attempt)
            except TimeoutError:
                continue
        raise RuntimeError(f"no answer to a registration on {self.group.path}")


class ObserverGroup:
    """Observers of `path`; `query(i)` gives the i-th observer's Uri-Query parts."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/keys",
        query: Callable[[int], tuple[str, ...]] = lambda index: (),
        addresses: Iterator[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.query = query
        self.addresses = addresses if addresses is not None else loopback_addresses()
        # Each observer waits a random time up to this (s) before it fetches the rest of a
        # block-wise notification (0: at once, as a device does; an experiment's knob).
        self.fetch_spread = 0.0
        self.observers: list[Observer] = []
        self.armed = False
        self.notified = 0
        self.all_notified = asyncio.Event()
        self.notifications: dict[int, int] = {}  # by message type (CON, NON, ...)
        self.block_fetches = 0
        self.block_errors = 0
        self.echo_challenges = 0
        # Every observer has its notification (the first block, if block-wise): how many, and
        # the server's CPU (s, from server_cpu) at the moment the last one came.
        self.first_blocks = 0
        self.server_cpu: Callable[[], float] = lambda: 0.0
        self.cpu_at_first_blocks = float("nan")

    @property
    def not_observing(self) -> int:
        """Registrations the server answered without Observe (a limit reached)."""
        return sum(1 for o in self.observers if not o.observing)

    async def grow_to(self, count: int) -> None:
        """Open sockets and register observations until `count` observers are in place."""
        loop = asyncio.get_running_loop()
        fresh: list[Observer] = []
        while len(self.observers) < count:
            index = len(self.observers)
            _, observer = await loop.create_datagram_endpoint(
                lambda index=index: Observer(self, self.query(index)),
                local_addr=(next(self.addresses), 0),
                remote_addr=(self.host, self.port),
            )
            self.observers.append(observer)
            fresh.append(observer)
        window = asyncio.Semaphore(REGISTER_WINDOW)

        async def register(observer: Observer) -> None:
            async with window:
                await observer.register()

        await asyncio.gather(*(register(o) for o in fresh))

    def arm(self) -> None:
        for observer in self.observers:
            observer.notified_at = observer.first_block_at = None
            observer.held_before = (observer.etag, observer.payload)
            observer.blocks = 0
        self.notified = self.first_blocks = 0
        self.cpu_at_first_blocks = float("nan")
        self.notifications = {}
        self.block_fetches = self.block_errors = 0
        self.all_notified.clear()
        self.armed = True

    def close(self) -> None:
        for observer in self.observers:
            if observer._retry is not None:
                observer._retry.cancel()
            if observer.transport is not None:
                observer.transport.close()


@dataclass(frozen=True)
class FanOut:
    observers: int
    notified: int  # observers that came to hold the new state
    store_commit: float  # change start -> the change committed
    first: float  # change start -> first observer holding the new state
    median: float
    p99: float
    last: float  # change start -> the last observer holding the new state
    payload_bytes: int  # of the new representation (all blocks)
    receive_drops: int  # datagrams dropped by full receive buffers during the fan-out
    server_drops: int  # ... of them at the server's socket
    con: int  # notifications that came CON
    non: int  # ... and NON
    block_fetches: int  # further blocks fetched with GET
    server_cpu: float  # s of the server's CPU from the change until the last one held it
    not_observing: int  # registrations answered without Observe
    # Until every observer had its notification (the first block, if block-wise): time of the
    # last and the server's CPU meanwhile.
    last_first_block: float
    first_block_cpu: float


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * fraction))]


async def measure_fan_out(
    group: ObserverGroup,
    change: Callable[[], Awaitable[tuple[float, float]]],
    server_cpu: Callable[[], float] = lambda: 0.0,
    timeout: float = 30.0,
) -> FanOut:
    """Arm every observer, let `change()` (-> (t0, t_committed)) rotate the keys or revoke a
    token, wait until every observer holds the new state, and time it from t0 (all on the
    system-wide monotonic clock)."""
    group.server_cpu = server_cpu
    group.arm()
    drops_before = udp_receive_drops()
    server_drops_before = socket_drops(group.port)
    cpu_before = server_cpu()
    t0, committed = await change()
    try:
        await asyncio.wait_for(group.all_notified.wait(), timeout)
    except TimeoutError:
        pass
    cpu = server_cpu() - cpu_before
    group.armed = False
    drops = udp_receive_drops() - drops_before
    server_drops = socket_drops(group.port) - server_drops_before
    done = [o for o in group.observers if o.notified_at is not None]
    times = sorted(o.notified_at - t0 for o in done)  # type: ignore[operator]
    firsts = [o.first_block_at - t0 for o in group.observers if o.first_block_at is not None]
    return FanOut(
        observers=len(group.observers),
        notified=len(times),
        store_commit=committed - t0,
        first=times[0] if times else float("nan"),
        median=_percentile(times, 0.5),
        p99=_percentile(times, 0.99),
        last=times[-1] if times else float("nan"),
        payload_bytes=max((o.size for o in done), default=0),
        receive_drops=drops,
        server_drops=server_drops,
        con=group.notifications.get(wire.CON, 0),
        non=group.notifications.get(wire.NON, 0),
        block_fetches=group.block_fetches,
        server_cpu=cpu,
        not_observing=group.not_observing,
        last_first_block=max(firsts, default=float("nan")),
        first_block_cpu=group.cpu_at_first_blocks - cpu_before,
    )
