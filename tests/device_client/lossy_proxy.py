"""A UDP relay between CoAP clients and one server that can lose the server's datagrams.

The test's stand-in for a lossy radio link: it parses just enough of RFC 7252 §3 (header,
message token, options, payload) to recognise a request and the datagrams answering it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

OBSERVE = 6  # RFC 7641 §2
URI_PATH = 11
URI_QUERY = 15
MAX_AGE = 14
TYPE_CON, TYPE_NON, TYPE_ACK = 0, 1, 2
SERVICE_UNAVAILABLE = (5 << 5) | 3  # 5.03


@dataclass(frozen=True)
class Datagram:
    type: int
    code: int
    message_id: int
    token: bytes
    options: tuple[tuple[int, bytes], ...]
    payload: bytes

    @property
    def path(self) -> str:
        return "/" + "/".join(v.decode() for n, v in self.options if n == URI_PATH)

    @property
    def query(self) -> tuple[str, ...]:
        return tuple(v.decode() for n, v in self.options if n == URI_QUERY)

    @property
    def observe(self) -> bool:
        return any(n == OBSERVE for n, _ in self.options)

    @property
    def is_request(self) -> bool:
        return 1 <= self.code <= 31


def parse(data: bytes) -> Datagram | None:
    """RFC 7252 §3; None for anything that is not a well-formed CoAP message."""
    try:
        tkl = data[0] & 0x0F
        token = data[4 : 4 + tkl]
        i, number, options, payload = 4 + tkl, 0, [], b""
        while i < len(data):
            if data[i] == 0xFF:
                payload = data[i + 1 :]
                break
            delta, length = data[i] >> 4, data[i] & 0x0F
            i += 1
            values = []
            for nibble in (delta, length):
                if nibble == 13:
                    values.append(data[i] + 13)
                    i += 1
                elif nibble == 14:
                    values.append(int.from_bytes(data[i : i + 2], "big") + 269)
                    i += 2
                else:
                    values.append(nibble)
            number += values[0]
            options.append((number, bytes(data[i : i + values[1]])))
            i += values[1]
        return Datagram(
            type=(data[0] >> 4) & 0x03,
            code=data[1],
            message_id=int.from_bytes(data[2:4], "big"),
            token=bytes(token),
            options=tuple(options),
            payload=bytes(payload),
        )
    except IndexError:
        return None


def service_unavailable(request: Datagram, max_age: int) -> bytes:
    """A 5.03 answering `request` with a Max-Age (RFC 7252 §5.9.3.4), piggybacked when CON."""
    kind = TYPE_ACK if request.type == TYPE_CON else TYPE_NON
    header = bytes([0x40 | (kind << 4) | len(request.token), SERVICE_UNAVAILABLE])
    header += request.message_id.to_bytes(2, "big") + request.token
    value = max_age.to_bytes(max(1, (max_age.bit_length() + 7) // 8), "big")
    # Option 14 = 13 + 1: delta nibble 13 with one extension byte.
    return header + bytes([0xD0 | len(value), MAX_AGE - 13]) + value


@dataclass
class Rule:
    """Matches requests; loses the server's datagrams answering them (or answers itself)."""

    matches: Callable[[Datagram], bool]
    # Let this many answering datagrams through per matching request first (1 for an
    # observation: the registration's answer arrives, the notifications do not).
    keep_first: int = 0
    # Lose at most this many datagrams in all (None: every one).
    limit: int | None = None
    # Answer matching requests with 5.03 and this Max-Age instead of forwarding them.
    unavailable_max_age: int | None = None
    tokens: dict[bytes, int] = field(default_factory=dict)
    dropped: int = 0
    matched: int = 0

    @property
    def active(self) -> bool:
        return self.limit is None or self.dropped < self.limit


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: LossyProxy, client: tuple[str, int]) -> None:
        self.proxy = proxy
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._from_server(data, self.client)


class LossyProxy(asyncio.DatagramProtocol):
    """Listen on 127.0.0.1:port; relay every client to `server` over its own socket."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.rules: list[Rule] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._upstreams: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        # Every well-formed datagram the server sent, in order (lost ones too).
        self.from_server: list[Datagram] = []

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    async def start(self) -> LossyProxy:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        for upstream in self._upstreams.values():
            upstream.close()
        if self._transport is not None:
            self._transport.close()

    def lose(self, matches: Callable[[Datagram], bool], **options: object) -> Rule:
        rule = Rule(matches, **options)  # type: ignore[arg-type]
        self.rules.append(rule)
        return rule

    # -- relaying -----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse(data)
        if message is not None and message.is_request:
            for rule in self.rules:
                if rule.active and rule.matches(message):
                    rule.matched += 1
                    if rule.unavailable_max_age is not None:
                        assert self._transport is not None
                        self._transport.sendto(
                            service_unavailable(message, rule.unavailable_max_age), addr
                        )
                        rule.dropped += 1
                        return
                    rule.tokens.setdefault(message.token, 0)
        upstream = self._upstreams.get(addr)
        if upstream is None:
            self._pending.setdefault(addr, []).append(data)
            if len(self._pending[addr]) == 1:
                asyncio.ensure_future(self._connect(addr))
            return
        upstream.sendto(data)

    async def _connect(self, client: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(self, client), remote_addr=self.server
        )
        self._upstreams[client] = transport
        for data in self._pending.pop(client, []):
            transport.sendto(data)

    def _from_server(self, data: bytes, client: tuple[str, int]) -> None:
        message = parse(data)
        if message is not None:
            self.from_server.append(message)
        if message is not None and message.token:
            for rule in self.rules:
                seen = rule.tokens.get(message.token)
                if seen is None or not rule.active:
                    continue
                rule.tokens[message.token] = seen + 1
                if seen >= rule.keep_first:
                    rule.dropped += 1
                    return
        assert self._transport is not None
        self._transport.sendto(data, client)
