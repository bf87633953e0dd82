"""Amplification (RFC 7252 §11.3, RFC 9175 §2.4): what one unprotected request from an
unverified address makes the server send, retransmissions included.

Two bench servers run with `verified_networks` empty, so that 127.0.0.0/8 counts as any
internet address: one in lab mode (`require_oscore` false: plain requests reach /token,
/revoke/trl ...) and one protected (the default). Each probe comes from its own loopback
address (127.2.0.k) and socket, a spoofed victim that never answers anything: every datagram
reaching it during WINDOW seconds is counted. A CON answer would be retransmitted (RFC 7252
§4.2: the first retransmission after ACK_TIMEOUT x [1, 1.5) = 2-3 s, so WINDOW sees it), and
any CON counts as a failure of the bound whatever its size. All probes run at once.

The verified path, for comparison: the same request from another fresh address (127.3.0.k),
repeated with the Echo value when challenged (RFC 9175 §2.3); the answer to that repeat.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lakers

from bench import coap_wire as wire
from bench.loadgen import token_request
from bench.processes import DataDir
from coap_auth.secure.edhoc import MESSAGE_1_PREFIX
from coap_auth.wire import ContentFormat

BOUND = 3.0  # RFC 9175 §2.4 / RFC 7252 §11.3: at most 3x the request's bytes
WINDOW = 3.5  # s a victim listens; covers the first retransmission of any CON
VERIFIED_WINDOW = 1.0  # s to collect the answer to the Echo-carrying repeat
LAB = "lab"  # require_oscore false
PROTECTED = "protected"
UNVERIFIED_SETTINGS = {
    LAB: {"COAP_AUTH_VERIFIED_NETWORKS": ""},
    PROTECTED: {"COAP_AUTH_VERIFIED_NETWORKS": "", "COAP_AUTH_REQUIRE_OSCORE": "true"},
}


@dataclass(frozen=True)
class Probe:
    name: str
    server: str  # LAB or PROTECTED
    code: int
    path: str
    query: tuple[str, ...] = ()
    accept: int | None = None
    observe: bool = False
    content_format: int | None = None
    payload: Callable[[], bytes] = lambda: b""
    token_length: int = wire.TOKEN_LENGTH

    def request(self, echo: bytes | None = None) -> bytes:
        """A CON request with a fresh message id and token."""
        options = wire.request_options(
            self.path,
            self.content_format,
            self.observe,
            query=self.query,
            accept=self.accept,
            echo=echo,
        )
        token = secrets.token_bytes(self.token_length)
        return wire.encode(wire.CON, self.code, random.randrange(0x10000), token, options,
                           self.payload())  # fmt: skip


def message_1() -> bytes:
    """An EDHOC message_1 as a device sends it (method 3, suite 2, a fresh C_I)."""
    initiator = lakers.EdhocInitiator()
    return MESSAGE_1_PREFIX + bytes(initiator.prepare_message_1(c_i=secrets.token_bytes(2)))


def probes(data: DataDir) -> list[Probe]:
    """Every unprotected request issue 16 lists, and /token, /revoke/trl?diff=32."""
    token_body = token_request(data.client_id, data.secret, "thermostat")
    get = wire.GET
    return [
        Probe("GET /keys", LAB, get, "/keys"),
        Probe("GET /keys, Accept 50 (JSON)", LAB, get, "/keys", accept=ContentFormat.JSON),
        Probe("GET /.well-known/core", LAB, get, "/.well-known/core"),
        Probe("GET /revoke/trl", LAB, get, "/revoke/trl"),
        Probe("GET /revoke/trl?diff=32", LAB, get, "/revoke/trl", query=("diff=32",)),
        Probe("GET /revoke/trl", PROTECTED, get, "/revoke/trl"),
        Probe("GET /keys, Observe 0", LAB, get, "/keys", observe=True),
        Probe("GET /revoke/trl, Observe 0", LAB, get, "/revoke/trl", observe=True),
        Probe(
            "POST /.well-known/edhoc message_1",
            LAB,
            wire.POST,
            "/.well-known/edhoc",
            content_format=ContentFormat.CID_EDHOC_CBOR_SEQ,
            payload=message_1,
        ),
        Probe(
            "POST /token (lab)",
            LAB,
            wire.POST,
            "/token",
            content_format=ContentFormat.ACE_CBOR,
            payload=lambda: token_body,
        ),
        Probe("GET /no-such-path", LAB, get, "/no-such-path"),
        Probe("GET /keys", PROTECTED, get, "/keys"),
        Probe("GET /no-such-path", PROTECTED, get, "/no-such-path"),
        # The smallest requests a challenge answers: no token, the shortest or no path.
        Probe("GET /keys, Observe 0, no token", LAB, get, "/keys", observe=True, token_length=0),
        Probe("GET /, Observe 0, no token", LAB, get, "/", observe=True, token_length=0),
        Probe("POST /token, no token, no payload", LAB, wire.POST, "/token", token_length=0),
    ]


class Victim(asyncio.DatagramProtocol):
    """A socket that records every datagram it receives and never sends one back."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[wire.Response] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.received.append(wire.decode(data))
        except (ValueError, IndexError):
            self.received.append(wire.Response(-1, -1, 0, b"", {}, b"", len(data), data))

    def error_received(self, exc: Exception) -> None:
        pass


@dataclass
class ProbeResult:
    probe: Probe
    request_bytes: int = 0
    datagrams: list[wire.Response] = field(default_factory=list)
    # The verified path: the Echo-carrying repeat and what answered it.
    verified_request_bytes: int = 0
    verified: list[wire.Response] = field(default_factory=list)
    challenged: bool = False  # the verified client was asked for an Echo first

    @property
    def received_bytes(self) -> int:
        return sum(d.size for d in self.datagrams)

    @property
    def ratio(self) -> float:
        return self.received_bytes / self.request_bytes

    @property
    def largest_ratio(self) -> float:
        """The largest single datagram over the request."""
        return max((d.size for d in self.datagrams), default=0) / self.request_bytes

    @property
    def con(self) -> int:
        return sum(1 for d in self.datagrams if d.mtype == wire.CON)

    @property
    def within(self) -> bool:
        return self.ratio <= BOUND and self.con == 0

    @property
    def codes(self) -> str:
        return ", ".join(_describe(d) for d in self.datagrams) or "nothing"

    @property
    def verified_bytes(self) -> int:
        return sum(d.size for d in self.verified)

    @property
    def verified_codes(self) -> str:
        return ", ".join(_describe(d) for d in self.verified) or "nothing"


def _describe(message: wire.Response) -> str:
    if message.mtype < 0:
        return "not CoAP"
    kind = ("CON", "NON", "ACK", "RST")[message.mtype]
    code = wire.code_text(message.code) if message.code else "empty"
    echo = " + Echo" if wire.ECHO in message.options else ""
    return f"{kind} {code}{echo}"


async def _socket(address: str, port: int) -> Victim:
    loop = asyncio.get_running_loop()
    _, victim = await loop.create_datagram_endpoint(
        Victim, local_addr=(address, 0), remote_addr=("127.0.0.1", port)
    )
    return victim


async def _unverified(result: ProbeResult, address: str, port: int) -> None:
    victim = await _socket(address, port)
    request = result.probe.request()
    result.request_bytes = len(request)
    assert victim.transport is not None
    victim.transport.sendto(request)
    await asyncio.sleep(WINDOW)
    victim.transport.close()
    result.datagrams = list(victim.received)


async def _verified(result: ProbeResult, address: str, port: int) -> None:
    client = await _socket(address, port)
    assert client.transport is not None
    client.transport.sendto(result.probe.request())
    for _ in range(20):  # the challenge comes at once
        await asyncio.sleep(0.05)
        if client.received:
            break
    echo = next((d.options[wire.ECHO] for d in client.received if wire.ECHO in d.options), None)
    result.challenged = echo is not None
    seen = len(client.received)
    if echo is not None:
        repeat = result.probe.request(echo)
        result.verified_request_bytes = len(repeat)
        client.transport.sendto(repeat)
        await asyncio.sleep(VERIFIED_WINDOW)
    else:  # answered at once (or not at all): that answer is the verified one
        result.verified_request_bytes = result.request_bytes
        seen = 0
        await asyncio.sleep(VERIFIED_WINDOW)
    client.transport.close()
    # Answers to the repeat; an ACK the challenge's CON request may still draw is not one.
    result.verified = [d for d in client.received[seen:] if d.code != 0 or d.mtype != wire.ACK]


async def measure(data: DataDir, ports: dict[str, int]) -> list[ProbeResult]:
    """Every probe against the server of its mode (`ports`: LAB/PROTECTED -> port): first all
    unverified at once, then all verified at once."""
    results = [ProbeResult(probe) for probe in probes(data)]
    await asyncio.gather(
        *(
            _unverified(r, f"127.2.0.{index + 1}", ports[r.probe.server])
            for index, r in enumerate(results)
        )
    )
    await asyncio.gather(
        *(
            _verified(r, f"127.3.0.{index + 1}", ports[r.probe.server])
            for index, r in enumerate(results)
        )
    )
    return results
