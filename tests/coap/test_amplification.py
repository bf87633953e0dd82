"""Issue 16: the AS is no reflector. From a source address it has not verified (servers here
are built with `verified_networks = ""`, so 127.0.0.1 is unverified), every answer is at most
3x its request and never a CON (RFC 9175 §2.4, RFC 7252 §11.3), and the Echo round trip
verifies the address for `echo_verified_lifetime`. Over real UDP, as raw datagrams, measuring
the bytes that actually arrive.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import aiocoap
import cbor2
import lakers
import pytest
from aiocoap.optiontypes import BlockOption, OpaqueOption

from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.echo import ECHO_VALUE_LIFETIME, EchoValues
from coap_auth.secure.edhoc import CID_EDHOC_CBOR_SEQ, MESSAGE_1_PREFIX
from coap_auth.service import AuthService, TokenRequest
from coap_auth.store import MasterKey
from coap_auth.tokens import token_hash
from coap_auth.wire import AceParam, ContentFormat
from tests.conftest import Coap, remember_secrets
from tests.raw_coap import number_request

ANSWER_TIMEOUT = 2.0  # real s for the answer to arrive over loopback
# Real s to keep listening after the answer: a separate response or a retransmission that
# follows it would arrive within this (aiocoap's empty-ACK delay is 0.1 s).
LINGER = 0.1
# Real s to listen for an answer that must not come.
SILENCE = 0.5


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Loopback is trusted by default; here it is not, so 127.0.0.1 is an unverified source.
    return replace(settings, verified_networks="")


@dataclass
class Probe:
    """One request sent from a fresh socket and every datagram that came back for it."""

    sent: bytes
    received: list[bytes] = field(default_factory=list)

    @property
    def answers(self) -> list[aiocoap.Message]:
        return [aiocoap.Message.decode(data) for data in self.received]

    @property
    def answer(self) -> aiocoap.Message:
        token = aiocoap.Message.decode(self.sent).token
        return next(m for m in self.answers if m.token == token and m.code != aiocoap.EMPTY)

    def assert_within_bound(self) -> None:
        """Every datagram that came back is at most 3x the request and none is a CON (which
        aiocoap would retransmit to an address that never asked)."""
        for data, message in zip(self.received, self.answers, strict=True):
            assert len(data) <= 3 * len(self.sent), (len(data), len(self.sent), message)
            assert message.mtype in (aiocoap.NON, aiocoap.ACK), message


async def probe(
    port: int,
    request: aiocoap.Message,
    mtype: aiocoap.Type = aiocoap.CON,
    *,
    sock: socket.socket | None = None,
    source: str = "127.0.0.1",
    timeout: float = ANSWER_TIMEOUT,
) -> Probe:
    """Send `request` (a fresh message id and token) to the server and collect what comes
    back until LINGER after its answer, or until `timeout` when none comes."""
    number_request(request, mtype)
    return await probe_datagram(port, request.encode(), sock=sock, source=source, timeout=timeout)


async def probe_datagram(
    port: int,
    datagram: bytes,
    *,
    sock: socket.socket | None = None,
    source: str = "127.0.0.1",
    timeout: float = ANSWER_TIMEOUT,
) -> Probe:
    """probe() for a request already encoded."""
    result = Probe(datagram)
    token = aiocoap.Message.decode(datagram).token
    loop = asyncio.get_running_loop()
    own = sock is None
    sock = sock if sock is not None else connected_socket(port, source)
    try:
        await loop.sock_sendall(sock, datagram)
        deadline = loop.time() + timeout
        answered = False
        while True:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), deadline - loop.time())
            except TimeoutError:
                return result
            result.received.append(data)
            message = aiocoap.Message.decode(data)
            if not answered and message.token == token and message.code != aiocoap.EMPTY:
                answered = True
                deadline = loop.time() + LINGER
    finally:
        if own:
            sock.close()


def connected_socket(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    return sock


def is_challenge(message: aiocoap.Message) -> bool:
    return (
        message.code == aiocoap.UNAUTHORIZED
        and message.opt.echo is not None
        and not message.payload
        and message.opt.observe is None
    )


# -- the requests, from an unverified source ----------------------------------------------------


def get(*path: str, **options: object) -> aiocoap.Message:
    return aiocoap.Message(code=aiocoap.GET, uri_path=path, **options)


def post_ace(path: str, body: object) -> aiocoap.Message:
    return aiocoap.Message(
        code=aiocoap.POST,
        uri_path=(path,),
        payload=cbor2.dumps(body),
        content_format=ContentFormat.ACE_CBOR,
    )


def token_request(coap: Coap) -> aiocoap.Message:
    secret = coap.secrets["lamp-1"]
    return post_ace("token", {AceParam.CLIENT_ID: "lamp-1", AceParam.CLIENT_SECRET: secret})


def edhoc_message_1() -> aiocoap.Message:
    message_1 = bytes(lakers.EdhocInitiator().prepare_message_1(c_i=b"\x07", ead_1=None))
    return aiocoap.Message(
        code=aiocoap.POST,
        uri_path=(".well-known", "edhoc"),
        payload=MESSAGE_1_PREFIX + message_1,
        content_format=CID_EDHOC_CBOR_SEQ,
    )


def oscore_unknown_kid() -> aiocoap.Message:
    # Flags: kid present (0x08), a 1-byte Partial IV; then the PIV and an unknown kid.
    request = aiocoap.Message(code=aiocoap.POST, payload=bytes(24))
    request.opt.oscore = b"\x09\x05" + b"nobody-knows-me"
    return request


def bad_critical_option() -> aiocoap.Message:
    request = get("keys")
    request.opt.add_option(OpaqueOption(65001, b"\x01"))
    return request


def block1_fragment(path: str) -> aiocoap.Message:
    request = aiocoap.Message(
        code=aiocoap.POST,
        uri_path=(path,),
        payload=b"\xa1" + bytes(15),
        content_format=ContentFormat.ACE_CBOR,
    )
    request.opt.block1 = BlockOption.BlockwiseTuple(0, True, 0)  # 16-byte blocks, more to come
    return request


CASES: dict[str, Callable[[Coap], aiocoap.Message]] = {
    "GET /keys": lambda coap: get("keys"),
    "GET /keys Accept 50": lambda coap: get("keys", accept=ContentFormat.JSON),
    "GET /.well-known/core": lambda coap: get(".well-known", "core"),
    "GET /revoke/trl": lambda coap: get("revoke", "trl"),
    "GET /revoke/trl?diff=8": lambda coap: get("revoke", "trl", uri_query=("diff=8",)),
    "POST /token": token_request,
    "POST /introspect": lambda coap: post_ace("introspect", {AceParam.TOKEN: b"x" * 40}),
    "POST /revoke": lambda coap: post_ace("revoke", {AceParam.TOKEN: b"x" * 40}),
    "POST /.well-known/edhoc message_1": lambda coap: edhoc_message_1(),
    "GET unknown path": lambda coap: get("nowhere"),
    "bad critical option": lambda coap: bad_critical_option(),
    "OSCORE unknown kid": lambda coap: oscore_unknown_kid(),
    "Block1 fragment /token": lambda coap: block1_fragment("token"),
    "Block1 fragment /revoke": lambda coap: block1_fragment("revoke"),
    "Observe /keys": lambda coap: get("keys", observe=0),
    "Observe /revoke/trl": lambda coap: get("revoke", "trl", observe=0),
}
# Answers that cannot fit 3x their request: they must be the Echo challenge.
TOO_LARGE = {"GET /keys", "GET /keys Accept 50", "GET /.well-known/core", "Observe /keys"}
TRL_ENTRIES = 32


@pytest.fixture
async def lab(sensor: Coap) -> Coap:
    """The lab-mode AS (plain CoAP reaches every endpoint) with TRL_ENTRIES revoked tokens."""
    await sensor.add_audience("a", "cwt", 600)
    await sensor.add_secret_client("lamp-1", ("a",), "temp:read")
    service = sensor.service
    for _ in range(TRL_ENTRIES):
        issued = await service.issue_token(
            TokenRequest(client_id="lamp-1", client_secret=sensor.secrets["lamp-1"])
        )
        assert await service.revoke_token_hash(token_hash(issued.access_token), actor="operator")
    return sensor


@pytest.fixture(params=["lab", "production"])
async def target(
    request: pytest.FixtureRequest, lab: Coap, settings: Settings, clock: SettableClock
) -> AsyncIterator[tuple[str, Coap]]:
    """The lab-mode AS, or a second AS on the same store with require_oscore on (the
    default)."""
    if request.param == "lab":
        yield "lab", lab
        return
    strict = replace(settings, require_oscore=True)
    service = AuthService(
        lab.service.store, MasterKey.load(settings.data_dir, create=False), strict, clock
    )
    await service.load_keys()
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    try:
        yield "production", Coap(lab.context, server.url, server, service, lab.secrets)
    finally:
        await server.stop()


# (mode, case) answered with the Echo challenge: the answer would be over 3x, or the request
# is a registration or changes state. In production mode /token, /introspect, /revoke and
# /revoke/trl answer unprotected requests with a short ProtectionRequired.
CHALLENGED = {
    *((mode, case) for mode in ("lab", "production") for case in TOO_LARGE),
    ("production", "Observe /revoke/trl"),
    *(
        ("lab", case)
        for case in (
            "Observe /revoke/trl",
            "GET /revoke/trl",
            "GET /revoke/trl?diff=8",
            "POST /token",
            "POST /introspect",
            "POST /revoke",
            "Block1 fragment /token",
            "Block1 fragment /revoke",
        )
    ),
}


@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON], ids=["CON", "NON"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_every_answer_to_an_unverified_source_is_within_3x_and_never_a_con(
    target: tuple[str, Coap], case: str, mtype: aiocoap.Type
) -> None:
    mode, coap = target
    port = coap.server.port
    assert port is not None
    before = coap.server.guard.challenges
    silent = case == "OSCORE unknown kid" and mtype == aiocoap.NON
    result = await probe(
        port, CASES[case](coap), mtype, timeout=SILENCE if silent else ANSWER_TIMEOUT
    )
    result.assert_within_bound()
    if silent:
        # ProtectedSite answers a refused OSCORE request only when it is a CON.
        assert not result.received
        return
    if (mode, case) in CHALLENGED:
        assert is_challenge(result.answer), result.answer
        assert coap.server.guard.challenges == before + 1
    else:
        assert not is_challenge(result.answer), result.answer
    assert not coap.server.verified.is_verified("127.0.0.1")


# The smallest requests there are: no token, hardly an option. Even the Echo challenge (19
# bytes with Max-Age) would be over 3x some of them.
TINY = {
    "GET / Observe": bytes([0x40, 0x01, 0x12, 0x34, 0x60]),
    "GET /keys Observe": bytes([0x40, 0x01, 0x12, 0x35, 0x60, 0x54]) + b"keys",
    "GET /keys": bytes([0x40, 0x01, 0x12, 0x36, 0xB4]) + b"keys",
    "POST /token": bytes([0x40, 0x02, 0x12, 0x37, 0xB5]) + b"token",
    "POST /token NON": bytes([0x50, 0x02, 0x12, 0x38, 0xB5]) + b"token",
    "GET /revoke/trl": bytes([0x40, 0x01, 0x12, 0x39, 0xB6]) + b"revoke" + b"\x03trl",
}


TINY_CHALLENGED = {"GET /keys", "GET /keys Observe"}
TINY_CHALLENGED_IN_LAB = {"POST /token", "POST /token NON", "GET /revoke/trl"}


@pytest.mark.parametrize("case", sorted(TINY))
async def test_the_smallest_requests_get_answers_within_3x(
    target: tuple[str, Coap], case: str
) -> None:
    mode, coap = target
    assert coap.server.port is not None
    result = await probe_datagram(coap.server.port, TINY[case])
    assert result.received, "no answer"
    result.assert_within_bound()
    answer = result.answer
    if case in TINY_CHALLENGED or (mode == "lab" and case in TINY_CHALLENGED_IN_LAB):
        assert is_challenge(answer), answer
    elif case == "GET / Observe":
        # 5 bytes: not even the challenge fits 15; a bare 4.01, header only.
        assert answer.code == aiocoap.UNAUTHORIZED and len(result.received[0]) == 4
    else:
        assert not is_challenge(answer), answer


# -- the Echo round trip ---------------------------------------------------------------------


def with_echo(request: aiocoap.Message, challenge: aiocoap.Message) -> aiocoap.Message:
    assert is_challenge(challenge), challenge
    request.opt.echo = challenge.opt.echo
    return request


async def test_the_echo_value_gets_the_answer_and_verifies_the_address_for_a_while(
    coap: Coap, clock: SettableClock
) -> None:
    server, port = coap.server, coap.server.port
    assert port is not None
    with connected_socket(port) as sock:
        challenge = (await probe(port, get("keys"), sock=sock)).answer
        assert is_challenge(challenge)
        # docs/protocol.md: a 12-byte value (4-byte timestamp, 8-byte MAC), Max-Age 0.
        assert len(challenge.opt.echo) == 12 and challenge.opt.max_age == 0
        stamp = int.from_bytes(challenge.opt.echo[:4], "big")
        assert stamp == clock.now() & 0xFFFFFFFF
        assert not server.verified.is_verified("127.0.0.1")

        # RFC 9175 §2.3: the same request again, with the value.
        answer = (await probe(port, with_echo(get("keys"), challenge), sock=sock)).answer
        assert answer.code == aiocoap.CONTENT
        kids = {key[2] for key in cbor2.loads(answer.payload)}
        assert kids == {k.kid for k in coap.service.keys.published()}

        # Verified now: no Echo needed, from another port of the same host too.
        clock.advance(server.verified.lifetime - 1)
        assert (await probe(port, get("keys"))).answer.code == aiocoap.CONTENT
        assert (await probe(port, get("keys"), sock=sock)).answer.code == aiocoap.CONTENT

        # Until echo_verified_lifetime has passed.
        clock.advance(1)
        assert is_challenge((await probe(port, get("keys"), sock=sock)).answer)


async def test_a_stale_echo_value_is_challenged_again(coap: Coap, clock: SettableClock) -> None:
    port = coap.server.port
    assert port is not None
    with connected_socket(port) as sock:
        old = (await probe(port, get("keys"), sock=sock)).answer
        clock.advance(ECHO_VALUE_LIFETIME + 1)
        again = (await probe(port, with_echo(get("keys"), old), sock=sock)).answer
        assert is_challenge(again)
        assert again.opt.echo != old.opt.echo
        assert not coap.server.verified.is_verified("127.0.0.1")
        # The fresh one works.
        answer = (await probe(port, with_echo(get("keys"), again), sock=sock)).answer
        assert answer.code == aiocoap.CONTENT


async def test_an_echo_value_issued_for_another_address_is_challenged_again(
    coap: Coap, clock: SettableClock
) -> None:
    port = coap.server.port
    assert port is not None
    # What the AS would have issued to 127.0.0.2 (the key is derived from the master key).
    values = EchoValues(coap.service.echo_key(), clock)
    foreign = aiocoap.Message(code=aiocoap.UNAUTHORIZED)
    foreign.opt.echo = values.issue("127.0.0.2")
    answer = (await probe(port, with_echo(get("keys"), foreign))).answer
    assert is_challenge(answer)
    assert not coap.server.verified.is_verified("127.0.0.1")
    # Not vacuous: from 127.0.0.2 the same value is good.
    answer = (await probe(port, with_echo(get("keys"), foreign), source="127.0.0.2")).answer
    assert answer.code == aiocoap.CONTENT
    assert coap.server.verified.is_verified("127.0.0.2")


async def test_an_observe_registration_needs_the_echo_then_is_notified(coap: Coap) -> None:
    port = coap.server.port
    assert port is not None
    loop = asyncio.get_running_loop()
    with connected_socket(port) as sock:
        challenge = (await probe(port, get("keys", observe=0), sock=sock)).answer
        assert is_challenge(challenge)
        registration = with_echo(get("keys", observe=0), challenge)
        answer = (await probe(port, registration, sock=sock)).answer
        assert answer.code == aiocoap.CONTENT and answer.opt.observe is not None

        await coap.service.rotate_keys(force=True, actor="operator")
        await coap.server.check_changes()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), ANSWER_TIMEOUT)
            notification = aiocoap.Message.decode(data)
            if notification.token == registration.token and notification.opt.observe:
                break
        if notification.mtype == aiocoap.CON:
            ack = aiocoap.Message(mtype=aiocoap.ACK, code=aiocoap.EMPTY)
            ack.mid = notification.mid
            await loop.sock_sendall(sock, ack.encode())
        assert notification.code == aiocoap.CONTENT


async def test_a_lab_mode_token_request_is_challenged_and_changes_nothing(
    lab: Coap, clock: SettableClock
) -> None:
    store, port = lab.service.store, lab.server.port
    assert port is not None

    async def state() -> tuple[int, int]:
        families = await store.list_families(None, clock.now())
        return len(families), len(await store.audit_entries())

    before = await state()
    with connected_socket(port) as sock:
        challenge = (await probe(port, token_request(lab), sock=sock)).answer
        assert is_challenge(challenge)
        assert await state() == before  # nothing issued, nothing written
        answer = (await probe(port, with_echo(token_request(lab), challenge), sock=sock)).answer
    assert answer.code == aiocoap.CREATED
    body = cbor2.loads(answer.payload)
    remember_secrets(body)
    assert AceParam.ACCESS_TOKEN in body
    assert await state() != before  # the check can fail: the token did change the store


async def test_challenges_are_logged_once_a_minute_without_a_traceback(
    coap: Coap, clock: SettableClock, caplog: pytest.LogCaptureFixture
) -> None:
    port = coap.server.port
    assert port is not None
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        assert is_challenge((await probe(port, get("keys"), aiocoap.NON)).answer)
    lines = [r for r in caplog.records if r.name == "coap_auth.echo"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO and "127.0.0.1" in lines[0].getMessage()
    clock.advance(60)
    assert is_challenge((await probe(port, get("keys"), aiocoap.NON)).answer)
    lines = [r for r in caplog.records if r.name == "coap_auth.echo"]
    assert len(lines) == 2 and "4 more" in lines[1].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


async def test_refusals_of_unverified_sources_do_not_flood_the_access_log(
    coap: Coap, caplog: pytest.LogCaptureFixture
) -> None:
    """Outsider test: every forged request was an INFO line (~50 GB a day at full rate).
    From an unverified address, refusals are one line per method and code per minute,
    whatever the paths."""
    port: int = coap.server.port  # type: ignore[assignment]
    caplog.set_level(logging.INFO)
    for n in range(30):
        for method in (aiocoap.DELETE, aiocoap.PUT):
            refused = aiocoap.Message(code=method, uri_path=("keys",), uri_query=(f"n={n}",))
            assert (await probe(port, refused, aiocoap.NON)).received
    lines = [r.getMessage() for r in caplog.records if r.name == "coap_auth.access"]
    assert len(lines) == 2, lines
    assert any("DELETE -> 4.05" in line for line in lines)
    assert any("PUT -> 4.05" in line for line in lines)


# -- the message layer's memory (an outsider test: a 4-byte duplicate drew a 49x answer) ------

PADDING = 65000  # an elective option nobody processes: a large request, a large answer


def padded_core_request() -> aiocoap.Message:
    request = get(".well-known", "core")
    request.opt.add_option(OpaqueOption(PADDING, b"\x00" * 80))
    return request


async def test_a_short_duplicate_does_not_replay_a_large_answer(coap: Coap) -> None:
    """aiocoap answers a duplicate (same endpoint and message id) with the answer it sent,
    for 247 s: a spoofed 4-byte datagram would draw an answer sized for a large request.
    Only a real retransmission (as long as the request) is answered again."""
    port: int = coap.server.port  # type: ignore[assignment]
    request = padded_core_request()
    with connected_socket(port) as sock:
        first = await probe(port, request, sock=sock)
        assert first.answer.code == aiocoap.CONTENT and len(first.answer.payload) > 100
        first.assert_within_bound()
        mid = aiocoap.Message.decode(first.sent).mid
        for _ in range(5):
            short = await probe_datagram(
                port, bytes([0x40, 0x01]) + mid.to_bytes(2, "big"), sock=sock, timeout=SILENCE
            )
            assert short.received == []
        again = await probe_datagram(port, first.sent, sock=sock)
        assert again.received and again.answer.payload == first.answer.payload


async def test_the_exchanges_remembered_are_bounded_and_nobody_is_locked_out(
    coap: Coap,
) -> None:
    """aiocoap remembered every message for 247 s without a bound; a global cap that refused
    new requests let one sender of NON datagrams lock every client out (an outsider test:
    51,000 datagrams). Now a source's oldest and then the oldest in all are forgotten."""
    port: int = coap.server.port  # type: ignore[assignment]
    (interface,) = [
        i.token_interface.message_interface
        for i in coap.server._context.request_interfaces  # type: ignore[union-attr]
        if hasattr(i, "token_interface")
    ]
    recent = interface._ctx._recent_messages
    recent.per_source, recent.max_entries = 20, 50
    with connected_socket(port, "127.0.0.3") as flood:
        for n in range(120):  # NON and CON alike (a CON's length is kept for duplicates)
            request = get("keys")
            number_request(request, aiocoap.NON if n % 2 else aiocoap.CON)
            flood.send(request.encode())
        await asyncio.sleep(0.3)  # real time: delivery
    assert len(recent) <= 50
    assert set(recent.lengths) <= set(recent)  # forgotten together (an outsider test: the
    # lengths were kept apart and outlived the entries under a flood)
    flooder = [k for k in recent if k[0].sockaddr[0].endswith("127.0.0.3")]
    assert len(flooder) == 20
    # Another client is answered, and its retransmission gets the remembered answer.
    with connected_socket(port, "127.0.0.4") as honest:
        first = await probe(port, padded_core_request(), sock=honest)
        assert first.answer.code == aiocoap.CONTENT
        again = await probe_datagram(port, first.sent, sock=honest)
        assert again.answer.payload == first.answer.payload
        assert again.answer.mid == first.answer.mid  # the same message: remembered


@pytest.mark.parametrize("szx", [None, 0, 1, 2])
async def test_a_uri_path_abbrev_request_is_measured_as_it_arrived(
    coap: Coap, szx: int | None
) -> None:
    """Outsider test: aiocoap's Site expands Uri-Path-Abbrev into the request in place, and
    the bound was taken on the expanded request (8.4x for a block of /.well-known/core)."""
    port: int = coap.server.port  # type: ignore[assignment]
    for number in (0, 1):
        request = aiocoap.Message(code=aiocoap.GET)
        request.opt.uri_path_abbrev = 0  # /.well-known/core
        if szx is not None:
            request.opt.block2 = BlockOption.BlockwiseTuple(number, False, szx)
        answer = await probe(port, request)
        assert answer.received
        answer.assert_within_bound()


async def test_a_registration_needs_an_echo_of_its_own_even_from_a_verified_address(
    coap: Coap,
) -> None:
    """Outsider test: forged registrations from a verified device's address (to ports of the
    forger's choosing) took the device's places and had notifications sent there. A
    registration now carries a fresh Echo value itself; other requests from the verified
    address still need none."""
    port: int = coap.server.port  # type: ignore[assignment]
    with connected_socket(port) as sock:
        challenge = (await probe(port, get("keys"), sock=sock)).answer
        assert is_challenge(challenge)
        verified = get("keys")
        verified.opt.echo = challenge.opt.echo
        assert (await probe(port, verified, sock=sock)).answer.code == aiocoap.CONTENT
        assert (await probe(port, get("keys"), sock=sock)).answer.code == aiocoap.CONTENT
        registration = get("keys")
        registration.opt.observe = 0
        refused = await probe(port, registration, sock=sock)
        assert is_challenge(refused.answer) and len(coap.server.observers) == 0
        again = get("keys")
        again.opt.observe = 0
        again.opt.echo = refused.answer.opt.echo
        accepted = (await probe(port, again, sock=sock)).answer
        assert accepted.code == aiocoap.CONTENT and accepted.opt.observe is not None
        assert len(coap.server.observers) == 1


async def test_forged_requests_cannot_spend_the_budget_of_the_address_they_name(
    service: AuthService, settings: Settings
) -> None:
    """Outsider test: spoofed POSTs to /.well-known/edhoc spent the named device's per-address
    budget (130 datagrams earned its message_1 a 4.29 for 45 s). Unverified requests spend a
    budget of their own, past which they get the Echo challenge; the address's owner answers
    it and spends the address's own budget."""
    service.settings = replace(settings, rate_limit_per_address=5)
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    try:
        port: int = server.port  # type: ignore[assignment]

        def garbage() -> aiocoap.Message:
            return aiocoap.Message(
                code=aiocoap.POST,
                uri_path=(".well-known", "edhoc"),
                payload=MESSAGE_1_PREFIX + b"\x00",
                content_format=CID_EDHOC_CBOR_SEQ,
            )

        for _ in range(5):  # what a forger can make this address spend
            assert (await probe(port, garbage())).answer.code == aiocoap.BAD_REQUEST
        challenge = (await probe(port, garbage())).answer
        assert is_challenge(challenge), challenge  # not 4.29
        owner = garbage()
        owner.opt.echo = challenge.opt.echo
        assert (await probe(port, owner)).answer.code == aiocoap.BAD_REQUEST  # rendered
        # Verified now, the address still cannot be spent by forgers (a later round of the
        # outsider test): requests that do not prove it keep to the unproven budget.
        assert server.verified.is_verified("127.0.0.1")
        for _ in range(5):
            challenge = (await probe(port, garbage())).answer
            assert is_challenge(challenge), challenge
        owner = garbage()
        owner.opt.echo = challenge.opt.echo
        assert (await probe(port, owner)).answer.code == aiocoap.BAD_REQUEST
    finally:
        await server.stop()
