"""Observe fan-out of `/keys`: many raw-UDP observers, one key rotation, time to the last one.

Every observer is its own socket (its own endpoint, as a device is), registers with a CON
GET carrying Observe 0 and its own message token, and ACKs each CON notification.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from bench import coap_wire as wire
from bench.processes import udp_receive_drops

KEYS_OBSERVE = wire.request_options("/keys", observe=True)
REGISTER_WINDOW = 200  # registrations in flight at once
REGISTER_TRIES = 5


class Observer(asyncio.DatagramProtocol):
    def __init__(self, group: ObserverGroup) -> None:
        self.group = group
        self.transport: asyncio.DatagramTransport | None = None
        self.token = random.randbytes(wire.TOKEN_LENGTH)
        self.registered: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        self.notified_at: float | None = None
        self.payload_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            message = wire.decode(data)
        except (ValueError, IndexError):
            return
        if message.mtype == wire.CON:
            self.transport.sendto(wire.empty_ack(message.mid))  # type: ignore[union-attr]
        if message.token != self.token or message.code != wire.CONTENT:
            return
        if not self.registered.done():
            if wire.OBSERVE in message.options:
                self.registered.set_result(message)
            return
        if self.group.armed and self.notified_at is None:
            self.notified_at = time.monotonic()
            self.payload_size = len(message.payload)
            self.group.notified += 1
            if self.group.notified == len(self.group.observers):
                self.group.all_notified.set()

    def error_received(self, exc: Exception) -> None:
        pass

    async def register(self) -> None:
        assert self.transport is not None
        mid = random.randrange(0x10000)
        request = wire.encode(wire.CON, wire.GET, mid, self.token, KEYS_OBSERVE, b"")
        for attempt in range(REGISTER_TRIES):
            self.transport.sendto(request)  # a retransmission keeps its message id
            try:
                await asyncio.wait_for(asyncio.shield(self.registered), 2.0 * 2**attempt)
                return
            except TimeoutError:
                continue
        raise RuntimeError("an observer could not register on /keys")


class ObserverGroup:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.observers: list[Observer] = []
        self.armed = False
        self.notified = 0
        self.all_notified = asyncio.Event()

    async def grow_to(self, count: int) -> None:
        """Open sockets and register observations until `count` observers are in place."""
        loop = asyncio.get_running_loop()
        fresh: list[Observer] = []
        while len(self.observers) < count:
            _, observer = await loop.create_datagram_endpoint(
                lambda: Observer(self), remote_addr=(self.host, self.port)
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
            observer.notified_at = None
        self.notified = 0
        self.all_notified.clear()
        self.armed = True

    def close(self) -> None:
        for observer in self.observers:
            if observer.transport is not None:
                observer.transport.close()


@dataclass(frozen=True)
class FanOut:
    observers: int
    notified: int
    store_commit: float  # rotation start -> the new key set committed
    first: float  # rotation start -> first observer notified
    median: float
    last: float  # rotation start -> the last observer notified
    payload_bytes: int
    receive_drops: int  # datagrams dropped by full receive buffers during the fan-out


async def measure_fan_out(group: ObserverGroup, rotate: Any, timeout: float = 30.0) -> FanOut:
    """Arm every observer, let `rotate()` (-> (t0, t_committed)) rotate the keys, wait for
    every notification, and time it from t0 (all on the system-wide monotonic clock)."""
    group.arm()
    drops_before = udp_receive_drops()
    t0, committed = await rotate()
    try:
        await asyncio.wait_for(group.all_notified.wait(), timeout)
    except TimeoutError:
        pass
    group.armed = False
    drops = udp_receive_drops() - drops_before
    times = sorted(o.notified_at - t0 for o in group.observers if o.notified_at is not None)
    sizes = [o.payload_size for o in group.observers if o.notified_at is not None]
    nan = float("nan")
    return FanOut(
        observers=len(group.observers),
        notified=len(times),
        store_commit=committed - t0,
        first=times[0] if times else nan,
        median=times[len(times) // 2] if times else nan,
        last=times[-1] if times else nan,
        payload_bytes=max(sizes, default=0),
        receive_drops=drops,
    )
