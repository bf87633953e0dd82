"""device_client's resource server is no amplifier (RFC 7252 §11.3, RFC 9175 §2.4): every
unprotected answer to a source address it has not verified is at most 3x its request, CON or
NON, over real UDP from raw datagrams; an answer that would be larger is a 4.01 with an Echo
option, and the request repeated with it gets the full answer. Answers that leave state
behind (/authz-info's 2.01, EDHOC's message_2) always fit and are never withheld; the 4.01
with AS Request Creation Hints is cut down to fit when it can. ResourceClient answers the
challenge by itself.

The RS here treats 127.0.0.1 as unverified (`verified_networks=()`); the default (loopback
verified, as on the AS) is checked too. Without the guard in ResourceServer.add_to, the hints
to a 9-byte GET (6.2x), the 4.15 of /authz-info (5.5x) and /.well-known/core (8.7x) break the
bound, and ResourceClient, challenged, fails unless it returns the Echo.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
import lakers
import pytest
from aiocoap import resource

from coap_auth.clock import SettableClock
from coap_auth.coap.server import _bound_port
from coap_auth.echo import datagram_size
from coap_auth.secure.edhoc import MESSAGE_1_PREFIX
from coap_auth.tokens import compress_cose_key, cose_key_from_public, encode_cwt
from coap_auth.wire import AceParam, AceProfile, CnfMethod, CoseAlg, TokenType
from device_client import (
    DeviceKey,
    ResourceClient,
    ResourceServer,
    SecretCredentials,
    TokenClient,
    create_client_context,
    create_server_context,
)
from device_client.resource_client import MAX_EAD_TOKEN_BYTES
from tests.conftest import SEEN_SECRETS
from tests.device_client.conftest import FAST_REFRESH
from tests.device_client.rs_site import (
    AUDIENCE,
    CF_ACE,
    CF_CWT,
    SIGN_KID,
    Minter,
    Temperature,
    minted_verifier,
)
from tests.device_client.test_token_client_profiles import fake_as
from tests.raw_coap import forged_request, raw_socket

AS_URI = "coap://auth.example.net"  # a realistic AS URI: the hints are then 49 bytes
CF_EDHOC = 65  # application/cid-edhoc+cbor-seq
SILENCE = 0.3  # s to wait for an answer that must not come (a NON refused by OSCORE)
_mids = iter(range(1, 0xFFFF))


@dataclass
class Rs:
    port: int
    base: str
    resource_server: ResourceServer
    minter: Minter
    identity: DeviceKey

    @property
    def challenges(self) -> int:
        assert self.resource_server.guard is not None
        return self.resource_server.guard.challenges


@asynccontextmanager
async def running_rs(clock: SettableClock, **options: Any) -> AsyncIterator[Rs]:
    """Both profiles, /temp, /.well-known/core, on 127.0.0.1; `options` go to the RS."""
    minter, verifier = minted_verifier(clock)
    identity = DeviceKey.generate(AUDIENCE)
    rs = ResourceServer(verifier, as_uri=AS_URI, identity=identity, **options)
    site = resource.Site()
    site.add_resource(["temp"], Temperature(rs))
    # As examples/thermostat_rs.py serves it: a link-format answer larger than 3x a short GET.
    site.add_resource(
        [".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader)
    )
    context = await create_server_context(rs.add_to(site), ("127.0.0.1", 0), check_options=False)
    port = _bound_port(context)
    base = f"coap://127.0.0.1:{port}"
    try:
        yield Rs(port, base, rs, minter, identity)
    finally:
        await context.shutdown()
        await rs.close()


@pytest.fixture
async def rs(clock: SettableClock) -> AsyncIterator[Rs]:
    async with running_rs(clock, verified_networks=()) as running:
        yield running


async def send(
    port: int,
    request: aiocoap.Message,
    mtype: aiocoap.Type,
    *,
    token: bytes = b"",
    source: str = "127.0.0.1",
    timeout: float = 2.0,
) -> tuple[int, bytes | None]:
    """Send `request` as one datagram (message token `token`) from `source`; the size of the
    datagram sent and the first datagram answering it (None when none came in `timeout`)."""
    request.mtype, request.mid, request.token = mtype, next(_mids), token
    datagram = request.encode()
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        await loop.sock_sendall(sock, datagram)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await loop.sock_recv(sock, 4096)
                    if aiocoap.Message.decode(data).token == token:
                        return len(datagram), data
        except TimeoutError:
            return len(datagram), None


def bounded(sent: int, answer: bytes | None, what: str) -> aiocoap.Message | None:
    """Assert the answer (if any) is at most 3x the request and never a CON (which would be
    retransmitted); return it decoded."""
    if answer is None:
        return None
    assert len(answer) <= 3 * sent, (
        f"{what}: {len(answer)} bytes answer {sent} ({len(answer) / sent:.1f}x)"
    )
    message = aiocoap.Message.decode(answer)
    assert message.mtype in (aiocoap.ACK, aiocoap.NON), what
    return message


def post(path: tuple[str, ...], payload: bytes = b"", **options: Any) -> aiocoap.Message:
    return aiocoap.Message(code=aiocoap.POST, uri_path=path, payload=payload, **options)


def message_1() -> bytes:
    initiator = lakers.EdhocInitiator()
    return MESSAGE_1_PREFIX + bytes(initiator.prepare_message_1(c_i=b"\x05", ead_1=None))


def unknown_kid() -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.POST, uri_path=("temp",), payload=bytes(12))
    request.opt.oscore = b"\x09\x01\x42"  # Partial IV 1, kid 0x42: no such context
    return request


# Requests that get no state-changing answer: (name, request). Short message tokens make
# the bound tightest.
REFUSED: list[tuple[str, Callable[[], aiocoap.Message]]] = [
    ("GET /temp", lambda: aiocoap.Message(code=aiocoap.GET, uri_path=("temp",))),
    ("PUT /temp", lambda: aiocoap.Message(code=aiocoap.PUT, uri_path=("temp",), payload=b"9")),
    ("authz-info empty", lambda: post(("authz-info",))),
    ("authz-info garbage cwt", lambda: post(("authz-info",), b"\x01\x02", content_format=CF_CWT)),
    (
        "authz-info garbage cwt, long",
        lambda: post(("authz-info",), bytes(40), content_format=CF_CWT),
    ),
    ("authz-info garbage ace", lambda: post(("authz-info",), b"\xa0", content_format=CF_ACE)),
    ("authz-info text/plain", lambda: post(("authz-info",), b"x", content_format=0)),
    (
        "authz-info ace, no nonce",
        lambda: post(("authz-info",), cbor2.dumps({1: bytes(60)}), content_format=CF_ACE),
    ),
    ("edhoc garbage", lambda: post((".well-known", "edhoc"), b"\x01", content_format=CF_EDHOC)),
    ("edhoc bad message_1", lambda: post((".well-known", "edhoc"), b"\xf5" + bytes(40))),
    ("OSCORE unknown kid", unknown_kid),
    ("unknown path", lambda: aiocoap.Message(code=aiocoap.GET, uri_path=("nope",))),
    (
        "/.well-known/core",
        lambda: aiocoap.Message(code=aiocoap.GET, uri_path=(".well-known", "core")),
    ),
]


@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON], ids=["CON", "NON"])
@pytest.mark.parametrize("token", [b"", b"\x01\x02", bytes(8)], ids=["tkl0", "tkl2", "tkl8"])
@pytest.mark.parametrize("name, build", REFUSED, ids=[name for name, _ in REFUSED])
async def test_refusals_stay_within_3x(
    rs: Rs, mtype: aiocoap.Type, token: bytes, name: str, build: Callable[[], aiocoap.Message]
) -> None:
    silent = name == "OSCORE unknown kid" and mtype == aiocoap.NON
    sent, answer = await send(
        rs.port, build(), mtype, token=token, timeout=SILENCE if silent else 2.0
    )
    if silent:
        # ProtectedSite answers no NON that failed OSCORE (RFC 7252 §11.3).
        assert answer is None
        return
    message = bounded(sent, answer, name)
    assert message is not None, f"{name}: no answer"
    assert message.code.is_response()


@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON], ids=["CON", "NON"])
async def test_hints_fit_or_come_after_the_echo(rs: Rs, mtype: aiocoap.Type) -> None:
    get = lambda: aiocoap.Message(code=aiocoap.GET, uri_path=("temp",))  # noqa: E731
    full = {1: AS_URI, 5: AUDIENCE, 9: "temp:read"}
    # With an 8-byte message token (17-byte request) the AS's URI alone fits in 51 bytes.
    sent, answer = await send(rs.port, get(), mtype, token=bytes(8))
    trimmed = bounded(sent, answer, "hints, tkl 8")
    assert trimmed is not None and trimmed.code == aiocoap.UNAUTHORIZED
    assert trimmed.opt.echo is None and cbor2.loads(trimmed.payload) == {1: AS_URI}

    # A 9-byte request: not even that fits. The challenge first, then all the hints.
    sent, answer = await send(rs.port, get(), mtype)
    challenge = bounded(sent, answer, "hints, tkl 0")
    assert challenge is not None and challenge.code == aiocoap.UNAUTHORIZED
    assert challenge.opt.echo is not None and not challenge.payload
    assert rs.challenges == 1 and len(rs.resource_server.verified) == 0

    repeat = get()
    repeat.opt.echo = challenge.opt.echo
    _, answer = await send(rs.port, repeat, mtype)
    assert answer is not None
    hints = aiocoap.Message.decode(answer)
    assert hints.code == aiocoap.UNAUTHORIZED and cbor2.loads(hints.payload) == full
    # 127.0.0.1 is now verified: the full hints without an Echo, even to a 9-byte request.
    assert len(rs.resource_server.verified) == 1
    _, answer = await send(rs.port, get(), mtype)
    assert answer is not None and cbor2.loads(aiocoap.Message.decode(answer).payload) == full
    assert rs.challenges == 1


async def test_an_echo_of_another_address_does_not_verify(rs: Rs) -> None:
    get = aiocoap.Message(code=aiocoap.GET, uri_path=("temp",))
    _, answer = await send(rs.port, get, aiocoap.CON, source="127.0.0.2")
    assert answer is not None
    echo = aiocoap.Message.decode(answer).opt.echo
    assert echo is not None
    stolen = aiocoap.Message(code=aiocoap.GET, uri_path=("temp",))
    stolen.opt.echo = echo
    sent, answer = await send(rs.port, stolen, aiocoap.CON, source="127.0.0.1")
    # Answered within the bound of the (now larger) request, and nobody verified.
    assert bounded(sent, answer, "stolen Echo") is not None
    assert len(rs.resource_server.verified) == 0
    assert not rs.resource_server.verified.is_verified("127.0.0.1")


@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON], ids=["CON", "NON"])
async def test_state_making_answers_are_never_withheld(rs: Rs, mtype: aiocoap.Type) -> None:
    """A valid upload and message_1 are answered in full at once (they fit), to a 0-byte
    message token."""
    server = rs.resource_server
    token, _ = rs.minter.oscore_token()
    body = cbor2.dumps({1: token, 40: secrets.token_bytes(8), 43: b"\x01"})
    sent, answer = await send(rs.port, post(("authz-info",), body, content_format=CF_ACE), mtype)
    created = bounded(sent, answer, "authz-info oscore")
    assert created is not None and created.code == aiocoap.CREATED
    assert set(cbor2.loads(created.payload)) == {AceParam.NONCE2, AceParam.ACE_SERVER_RECIPIENTID}
    assert len(server.contexts) == 1

    holder = DeviceKey.generate("dev-1")
    pop = rs.minter.pop_token(holder)
    sent, answer = await send(rs.port, post(("authz-info",), pop, content_format=CF_CWT), mtype)
    created = bounded(sent, answer, "authz-info pop")
    assert created is not None and created.code == aiocoap.CREATED
    assert server.held_pop_tokens("dev-1")

    sent, answer = await send(
        rs.port, post((".well-known", "edhoc"), message_1(), content_format=CF_EDHOC), mtype
    )
    message_2 = bounded(sent, answer, "EDHOC message_2")
    assert message_2 is not None and message_2.code == aiocoap.CHANGED and message_2.payload
    assert server.edhoc is not None and server.edhoc.responder.pending == 1
    assert rs.challenges == 0


async def test_a_forged_source_gets_no_more_than_3x(rs: Rs) -> None:
    """A datagram with a victim's source address and port (raw socket): what reaches the
    victim stays within the bound."""
    raw = raw_socket()
    if raw is None:
        pytest.skip("raw sockets need root or CAP_NET_RAW")
    with raw, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim:
        victim.bind(("127.0.0.1", 0))
        victim_port = victim.getsockname()[1]
        for request in (
            aiocoap.Message(code=aiocoap.GET, uri_path=("temp",)),
            aiocoap.Message(code=aiocoap.GET, uri_path=(".well-known", "core")),
            post(("authz-info",), b"x", content_format=0),
        ):
            answer = await forged_request(raw, rs.port, victim_port, request)
            size = len(request.encode())  # as forged_request numbered it
            assert datagram_size(answer, len(answer.token)) <= 3 * size
            assert answer.mtype in (aiocoap.ACK, aiocoap.NON)


async def test_loopback_is_verified_by_default_and_the_table_is_bounded(
    clock: SettableClock,
) -> None:
    get = lambda: aiocoap.Message(code=aiocoap.GET, uri_path=("temp",))  # noqa: E731
    async with running_rs(clock) as default:
        assert default.resource_server.verified.max_entries == 1024
        _, answer = await send(default.port, get(), aiocoap.CON)
        assert answer is not None
        assert cbor2.loads(aiocoap.Message.decode(answer).payload)[1] == AS_URI
        assert default.challenges == 0
    async with running_rs(clock, verified_networks="", max_verified=2) as small:
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            _, answer = await send(small.port, get(), aiocoap.CON, source=host)
            assert answer is not None
            repeat = get()
            repeat.opt.echo = aiocoap.Message.decode(answer).opt.echo
            _, answer = await send(small.port, repeat, aiocoap.CON, source=host)
            assert answer is not None and aiocoap.Message.decode(answer).opt.echo is None
        verified = small.resource_server.verified
        assert len(verified) == 2 and not verified.is_verified("127.0.0.2")
        assert verified.is_verified("127.0.0.4")
        # Verified for an hour, then challenged again.
        clock.advance(3601)
        assert not verified.is_verified("127.0.0.4")
    with pytest.raises(ValueError):
        ResourceServer(default.resource_server.verifier, max_verified=0)


# -- ResourceClient answers the challenge ----------------------------------------------------


def _pop_token(minter: Minter, holder: DeviceKey, *, compressed: bool) -> bytes:
    """An edhoc_oscore token for `holder`; its cnf point compressed as the AS sends it (the
    token then fits EAD_3) or not (too long: uploaded to /authz-info first)."""
    cnf_key = cose_key_from_public(holder.private_key.public_key())
    if compressed:
        cnf_key = compress_cose_key(cnf_key)
    claims = minter.claims(holder.client_id, "temp:read", AUDIENCE, 600, cnf_key=cnf_key)
    token = encode_cwt(claims, minter.signing, CoseAlg.ES256, SIGN_KID)
    SEEN_SECRETS.add(token)
    assert (len(token) <= MAX_EAD_TOKEN_BYTES) == compressed
    return token


def _answer_for(
    rs: Rs, profile: int, holder: DeviceKey, *, compressed: bool = True
) -> Callable[[dict[Any, Any]], Any]:
    def answer(params: dict[Any, Any]) -> dict[Any, Any]:
        body: dict[Any, Any] = {
            AceParam.EXPIRES_IN: 600,
            AceParam.TOKEN_TYPE: TokenType.POP,
            AceParam.ACE_PROFILE: profile,
        }
        if profile == AceProfile.COAP_OSCORE:
            token, material = rs.minter.oscore_token(sub=holder.client_id)
            body[AceParam.CNF] = {CnfMethod.OSC: material}
        else:
            token = _pop_token(rs.minter, holder, compressed=compressed)
            body[AceParam.CNF] = {
                CnfMethod.COSE_KEY: cose_key_from_public(holder.private_key.public_key())
            }
            rs_cnf = cose_key_from_public(rs.identity.private_key.public_key())
            body[AceParam.RS_CNF] = {CnfMethod.COSE_KEY: rs_cnf}
        body[AceParam.ACCESS_TOKEN] = token
        return body

    return answer


@pytest.mark.parametrize(
    "profile, long_token",
    [
        (AceProfile.COAP_OSCORE, False),
        (AceProfile.COAP_EDHOC_OSCORE, False),
        (AceProfile.COAP_EDHOC_OSCORE, True),
    ],
    ids=["coap_oscore", "edhoc_oscore-ead3", "edhoc_oscore-upload"],
)
async def test_resource_client_answers_the_echo(
    rs: Rs, clock: SettableClock, profile: int, long_token: bool
) -> None:
    """An RS that challenges every unprotected request from an unverified address first
    (stricter than ours needs to be): the device's first unprotected request (the
    /authz-info upload, or EDHOC's message_1) is challenged, answered, and the exchange goes
    on; a protected GET then reads the temperature."""
    assert rs.resource_server.guard is not None
    rs.resource_server.guard.echo_first = lambda request: request.opt.oscore is None
    holder = DeviceKey.generate("meter-7")
    answer_for = _answer_for(rs, profile, holder, compressed=not long_token)
    async with fake_as(answer_for) as (as_base, _):
        context = await create_client_context()
        try:
            tokens = TokenClient(
                context,
                as_base,
                holder
                if profile == AceProfile.COAP_EDHOC_OSCORE
                else SecretCredentials(holder.client_id, "s" * 32),
                audience=AUDIENCE,
                clock=clock,
                policy=FAST_REFRESH,
            )
            async with ResourceClient(context, rs.base, tokens, key=holder, timeout=2.0) as client:
                answer = await client.request(aiocoap.GET, "temp")
                assert answer.code == aiocoap.CONTENT and answer.payload == b"21.5"
                assert client.handshakes == 1
        finally:
            await context.shutdown()
    assert rs.challenges == 1
    assert len(rs.resource_server.verified) == 1 and len(rs.resource_server.contexts) == 1
