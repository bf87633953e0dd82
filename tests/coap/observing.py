"""Helpers of the Observe tests: a server with its own Observe settings, and an observer on a
raw UDP socket that sees every datagram (message types, Observe values, blocks)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiocoap

from coap_auth.coap.server import Server
from coap_auth.service import AuthService

WITHIN = 2.0  # real seconds: UDP delivery on loopback only

_message_ids = itertools.count(0x4000)


@asynccontextmanager
async def server_with(service: AuthService, **settings: Any) -> AsyncIterator[Server]:
    """A running server whose settings differ from the fixture's by `settings`."""
    service.settings = replace(service.settings, **settings)
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class RawObserver:
    """One UDP socket (from `source`) registering observations by hand."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", port))
        self.pending: list[aiocoap.Message] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, message: aiocoap.Message) -> None:
        self.sock.send(message.encode())

    def request(
        self,
        path: str,
        *,
        observe: int | None = 0,
        mtype: aiocoap.Type = aiocoap.CON,
        token: bytes | None = None,
        **options: Any,
    ) -> aiocoap.Message:
        """Send a GET of `path` (a query after "?"), on a fresh message token unless `token`
        is given; the request sent."""
        number = next(_message_ids) & 0xFFFF
        uri_path, _, query = path.partition("?")
        message = aiocoap.Message(
            code=aiocoap.GET,
            uri_path=tuple(p for p in uri_path.split("/") if p),
            uri_query=tuple(q for q in query.split("&") if q),
            **options,
        )
        if observe is not None:
            message.opt.observe = observe
        message.mtype, message.mid = mtype, number
        message.token = token if token is not None else number.to_bytes(3, "big")
        self.send(message)
        return message

    async def receive(self, timeout: float = WITHIN) -> aiocoap.Message:
        """The next datagram (ACKing nothing: the caller decides)."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        return aiocoap.Message.decode(data)

    async def answer(self, request: aiocoap.Message, timeout: float = WITHIN) -> aiocoap.Message:
        """The response to `request`, piggybacked or separate (a separate CON response, when
        the server took longer than aiocoap's empty-ACK delay, is acknowledged); other
        datagrams are kept for `notifications`."""
        while True:
            message = await self.receive(timeout)
            if message.token == request.token and message.code.is_response():
                if message.mtype == aiocoap.CON:
                    self.send(ack(message))
                return message
            if message.code != aiocoap.EMPTY:  # not the empty ACK of a separate response
                self.pending.append(message)

    async def register(self, path: str = "/keys", **options: Any) -> aiocoap.Message:
        """Register and return the answer."""
        return await self.answer(self.request(path, **options))

    async def notifications(self, count: int, timeout: float = WITHIN) -> list[aiocoap.Message]:
        """The next `count` notifications (datagrams carrying a response code)."""
        found = [m for m in self.pending if m.code.is_response()]
        self.pending = []
        while len(found) < count:
            found.append(await self.receive(timeout))
        return found

    async def quiet(self, timeout: float = 0.2) -> bool:
        """Whether nothing arrives for `timeout` seconds."""
        try:
            message = await self.receive(timeout)
        except TimeoutError:
            return True
        self.pending.append(message)
        return False


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (real time, polling) until `condition()` holds: for what another process or the
    network does. Raises TimeoutError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def reset(message: aiocoap.Message) -> aiocoap.Message:
    """The RST an observer that lost interest answers a CON with (RFC 7641 §3.6)."""
    rst = aiocoap.Message(code=aiocoap.EMPTY)
    rst.mtype, rst.mid = aiocoap.RST, message.mid
    return rst


def ack(message: aiocoap.Message) -> aiocoap.Message:
    empty = aiocoap.Message(code=aiocoap.EMPTY)
    empty.mtype, empty.mid = aiocoap.ACK, message.mid
    return empty
