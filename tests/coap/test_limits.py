"""Limits over real UDP (issue 8): payload cap (also block-wise), CBOR depth, rate limits per
address and per client, the amplification bound of RFC 7252 §11.3, one log line per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.service import AuthService
from coap_auth.store import MasterKey, SqliteStore
from coap_auth.wire import AceParam, CoapCode, ContentFormat
from tests.conftest import Coap, remember_secrets

RECV_TIMEOUT = 5


def raw_exchange(
    port: int, message: aiocoap.Message, mid: int, sock: socket.socket | None = None
) -> tuple[bytes, bytes, aiocoap.Message]:
    """Send one CON request as raw bytes (from `sock`, or a fresh socket); return both
    datagrams and the decoded answer."""
    message.mtype, message.mid, message.token = aiocoap.CON, mid, b"\x0b"
    datagram = message.encode()
    with contextlib.ExitStack() as stack:
        if sock is None:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.settimeout(RECV_TIMEOUT)
        sock.sendto(datagram, ("127.0.0.1", port))
        answer = sock.recv(4096)
    return datagram, answer, aiocoap.Message.decode(answer)


@pytest.mark.parametrize(
    ("path", "code", "payload", "query"),
    [
        ("token", aiocoap.POST, b"\xa0", ()),  # empty map: invalid_request
        ("token", aiocoap.POST, b"\xff", ()),  # not CBOR
        ("token", aiocoap.PUT, b"", ()),  # wrong method
        ("introspect", aiocoap.POST, b"\x01", ()),
        ("revoke", aiocoap.POST, b"\xa1\x0b\x40", ()),
        ("revoke", aiocoap.GET, b"", ()),
        ("revoke/trl", aiocoap.GET, b"", ("diff=x",)),
        ("revoke/trl", aiocoap.GET, b"", ("cursor=1",)),
        ("keys", aiocoap.GET, b"", ()),  # with a bad Accept, below
    ],
)
async def test_unauthenticated_errors_are_at_most_three_times_the_request(
    sensor: Coap, path: str, code: aiocoap.Code, payload: bytes, query: tuple[str, ...]
) -> None:
    message = aiocoap.Message(code=code, uri_path=tuple(path.split("/")), payload=payload)
    if payload:
        message.opt.content_format = ContentFormat.ACE_CBOR
    if query:
        message.opt.uri_query = query
    if path == "keys":
        message.opt.accept = ContentFormat.ACE_CBOR
    request, answer, response = await asyncio.to_thread(
        raw_exchange, sensor.server.port, message, 0x1001
    )
    assert response.code.is_response() and 128 <= response.code < 160, response.code
    # RFC 7252 §11.3: the answer to an unauthenticated request is not a lever.
    assert len(answer) <= 3 * len(request), (len(answer), len(request))
    if response.payload:
        cbor2.loads(response.payload)  # still a well-formed body, if a compact one


async def test_a_roomy_request_gets_the_full_error_text(sensor: Coap) -> None:
    body = {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: "wrong" * 10}
    response, err = await sensor.post_ace("/token", body)
    assert response.code == CoapCode.UNAUTHORIZED
    assert err == {30: 2, 31: "client authentication failed"}


async def test_block_wise_upload_past_the_cap_is_refused_at_once(sensor: Coap) -> None:
    """RFC 7959 §2.9.3: 4.13 with Size1 as soon as the blocks pass max_payload (2048), before
    anything is assembled, whatever the client says is still to come."""
    port = sensor.server.port
    block = b"\x00" * 1024
    answers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # one endpoint, one upload
        for number in range(3):
            message = aiocoap.Message(code=aiocoap.POST, uri_path=("token",), payload=block)
            message.opt.content_format = ContentFormat.ACE_CBOR
            message.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(number, True, 6)
            _, _, response = await asyncio.to_thread(
                raw_exchange, port, message, 0x2000 + number, sock
            )
            answers.append(response)
    assert [a.code for a in answers[:2]] == [aiocoap.CONTINUE, aiocoap.CONTINUE]
    refused = answers[2]
    assert refused.code == CoapCode.REQUEST_ENTITY_TOO_LARGE
    assert refused.opt.size1 == 2048
    assert refused.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR


async def test_deep_cbor_is_invalid_request(sensor: Coap) -> None:
    nested: Any = "x"
    for _ in range(40):
        nested = [nested]
    for body in ({AceParam.CLIENT_ID: nested}, {"x": nested}, {AceParam.REQ_CNF: {1: nested}}):
        response, err = await sensor.post_ace("/token", body)
        assert response.code == CoapCode.BAD_REQUEST and err[AceParam.ERROR] == 1
    # A self-referencing value (shared-reference tags 28/29) is no different.
    cyclic = b"\xa1\x18\x18\xd8\x1c\x81\xd8\x1d\x00"  # {24: 28([29(0)])}
    response = await sensor.request(aiocoap.POST, "/token", cyclic, ContentFormat.ACE_CBOR)
    assert response.code == CoapCode.BAD_REQUEST


@pytest.fixture
async def limited(settings: Settings, clock: SettableClock, tmp_path: Path) -> AsyncIterator[Coap]:
    """A server with small rate limits: 7 POSTs per address, 3 requests per client, per 60 s."""
    settings = dataclasses.replace(
        settings,
        data_dir=tmp_path / "limited",
        rate_limit_per_address=7,
        rate_limit_per_client=3,
        rate_limit_window=60,
    )
    settings.data_dir.mkdir()
    master_key = MasterKey.load(settings.data_dir, create=True)
    store = SqliteStore.in_data_dir(settings.data_dir, master_key)
    await store.open()
    service = AuthService(store, master_key, settings, clock)
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    context = await aiocoap.Context.create_client_context()
    coap = Coap(context, f"coap://127.0.0.1:{server.port}", server, service)
    await coap.add_audience("thermostat")
    await coap.add_secret_client("sensor-1", ("thermostat",), "temp:read")
    await coap.add_secret_client("sensor-2", ("thermostat",), "temp:read")
    try:
        yield coap
    finally:
        await context.shutdown()
        await server.stop()
        await store.close()


def cred(coap: Coap, client_id: str) -> dict[int, str]:
    return {AceParam.CLIENT_ID: client_id, AceParam.CLIENT_SECRET: coap.secrets[client_id]}


async def test_per_client_rate_limit_counts_only_authenticated_requests(limited: Coap) -> None:
    clock = limited.service.clock
    clock.set(clock.now() - clock.now() % 60)  # the start of a window
    # Failed attempts under sensor-2's name do not use up sensor-2's budget.
    for _ in range(2):
        bad = {AceParam.CLIENT_ID: "sensor-2", AceParam.CLIENT_SECRET: "guess-0123456789"}
        response, _ = await limited.post_ace("/token", bad)
        assert response.code == CoapCode.UNAUTHORIZED
    for _ in range(3):
        response, _ = await limited.post_ace("/token", cred(limited, "sensor-1"))
        assert response.code == aiocoap.CREATED
    # sensor-1's fourth request in the window: 4.29, Max-Age until the window ends.
    clock.advance(20)
    response, body = await limited.post_ace("/token", cred(limited, "sensor-1"))
    assert response.code == CoapCode.TOO_MANY_REQUESTS
    assert response.opt.max_age == 40
    assert response.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR
    assert body[-2] == "too many requests from this client"
    clock.advance(40)  # a new window
    response, _ = await limited.post_ace("/token", cred(limited, "sensor-1"))
    assert response.code == aiocoap.CREATED


async def test_per_address_rate_limit_covers_every_post_endpoint(limited: Coap) -> None:
    clock = limited.service.clock
    clock.set(clock.now() - clock.now() % 60)
    store = limited.service.store
    for path in ("/token", "/revoke", "/introspect", "/token", "/revoke", "/introspect", "/token"):
        response, _ = await limited.post_ace(path, {AceParam.CLIENT_ID: "nobody"})
        assert response.code in (CoapCode.UNAUTHORIZED, CoapCode.BAD_REQUEST), path
    before = await store.change_counters(), len(await store.audit_entries())
    response, body = await limited.post_ace("/token", cred(limited, "sensor-2"))
    assert response.code == CoapCode.TOO_MANY_REQUESTS and response.opt.max_age == 60
    assert (await store.change_counters(), len(await store.audit_entries())) == before
    # Reading keys and the TRL is not limited.
    assert (await limited.request(aiocoap.GET, "/keys")).code == aiocoap.CONTENT


async def test_one_log_line_per_request_with_caller_and_outcome(
    sensor: Coap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="coap_auth.access")
    await sensor.post_ace("/token", {**cred(sensor, "sensor-1"), AceParam.AUDIENCE: "thermostat"})
    await sensor.post_ace("/token", {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: "x"})
    await sensor.request(aiocoap.GET, "/keys")
    lines = [r.getMessage() for r in caplog.records if r.name == "coap_auth.access"]
    assert len(lines) == 3, lines
    assert "POST /token from=127.0.0.1 caller=sensor-1 -> 2.01 ok" in lines[0]
    assert "caller=sensor-1 -> 4.01 client authentication failed" in lines[1]
    assert "GET /keys from=127.0.0.1 caller=- -> 2.05" in lines[2]
    assert [r.levelno for r in caplog.records if r.name == "coap_auth.access"] == [
        logging.INFO,
        logging.INFO,
        logging.DEBUG,
    ]


# -- block-wise uploads (RFC 7959 Block1) -----------------------------------------------------

BLOCK_SZX = 4  # 256-byte blocks


def block(
    number: int,
    more: bool,
    payload: bytes | None = None,
    *,
    path: str = "token",
    query: tuple[str, ...] = (),
    szx: int = BLOCK_SZX,
) -> aiocoap.Message:
    """One Block1 fragment of a POST; a fragment with more to come is a whole block."""
    size = 2 ** (szx + 4)
    message = aiocoap.Message(
        code=aiocoap.POST, uri_path=tuple(path.split("/")), payload=payload or b"\x00" * size
    )
    message.opt.content_format = ContentFormat.ACE_CBOR
    message.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(number, more, szx)
    if query:
        message.opt.uri_query = query
    return message


def source(address: str = "127.0.0.1") -> socket.socket:
    """A UDP socket sending from `address` (any 127/8 address is local on Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    return sock


async def send(
    port: int, message: aiocoap.Message, sock: socket.socket, mid: list[int]
) -> aiocoap.Message:
    mid[0] += 1
    _, _, response = await asyncio.to_thread(raw_exchange, port, message, mid[0], sock)
    return response


async def test_block_wise_token_request_completes(sensor: Coap) -> None:
    """A real request in 16-byte blocks: 2.31 Continue for each block but the last, whose
    answer is the token response and echoes its Block1 option (RFC 7959 §2.3)."""
    body = {**cred(sensor, "sensor-1"), AceParam.AUDIENCE: "thermostat"}
    remember_secrets(body)
    payload = cbor2.dumps(body)
    chunks = [payload[i : i + 16] for i in range(0, len(payload), 16)]
    mid = [0x3000]
    with source() as sock:
        for number, chunk in enumerate(chunks):
            last = number == len(chunks) - 1
            response = await send(
                sensor.server.port, block(number, not last, chunk, szx=0), sock, mid
            )
            if not last:
                assert response.code == aiocoap.CONTINUE
                assert response.opt.block1.block_number == number
    assert response.code == aiocoap.CREATED, response.payload
    assert response.opt.block1.block_number == len(chunks) - 1
    remember_secrets(cbor2.loads(response.payload))
    assert len(sensor.server.uploads) == 0  # nothing held once it is done


@pytest.mark.parametrize("path", ["token", "keys", ".well-known/core"])
async def test_block1_flood_from_one_address_is_rate_limited_and_bounded(
    limited: Coap, path: str
) -> None:
    """Every fragment, to any resource, counts toward the per-address limit (7 here); and
    however many uploads one address starts, at most MAX_UPLOADS_PER_ADDRESS are held."""
    clock = limited.service.clock
    clock.set(clock.now() - clock.now() % 60)
    uploads = limited.server.uploads
    cap = uploads.max_per_address
    answers = []
    mid = [0x4000]
    with source() as sock:
        for number in range(20):  # each a new upload: another resource URI (query)
            message = block(0, True, path=path, query=(f"n={number}",))
            answers.append(await send(limited.server.port, message, sock, mid))
            assert len(uploads) <= cap
        codes = [a.code for a in answers]
        assert codes[:cap] == [aiocoap.CONTINUE] * cap
        # RFC 7959 §2.5: 4.13 when the server lacks the resources to hold another upload.
        assert codes[cap:7] == [CoapCode.REQUEST_ENTITY_TOO_LARGE] * (7 - cap)
        assert all(a.opt.size1 == 2048 for a in answers[cap:7])
        # RFC 8516: past the per-address limit, 4.29 with Max-Age until the window ends.
        assert codes[7:] == [CoapCode.TOO_MANY_REQUESTS] * 13
        assert all(a.opt.max_age == 60 for a in answers[7:])
        assert len(uploads) == cap and uploads.from_address("127.0.0.1") == cap
        # The fragments used up the budget every POST of this address shares.
        response, _ = await limited.post_ace("/token", cred(limited, "sensor-1"))
        assert response.code == CoapCode.TOO_MANY_REQUESTS
        # Unfinished uploads are dropped once their lifetime has passed (RFC 7959 §2.5).
        clock.advance(uploads.lifetime + 60)
        response = await send(limited.server.port, block(0, True, path=path), sock, mid)
        assert response.code == aiocoap.CONTINUE
        assert len(uploads) == 1


async def test_an_upload_with_a_mass_of_options_is_not_held(sensor: Coap) -> None:
    """Memory per held upload is bounded by its options too: a first block carrying thousands
    of (empty) Uri-Query options is refused, not kept."""
    mid = [0x5800]
    with source() as sock:
        message = block(0, True, query=("",) * 1000)
        response = await send(sensor.server.port, message, sock, mid)
        assert response.code == CoapCode.BAD_REQUEST
        assert len(sensor.server.uploads) == 0
        # An ordinary first block with a query is held.
        response = await send(sensor.server.port, block(0, True, query=("n=1",)), sock, mid)
        assert response.code == aiocoap.CONTINUE
        assert len(sensor.server.uploads) == 1


async def test_uploads_in_flight_are_capped_in_all(sensor: Coap) -> None:
    """Past max_uploads, the least recently continued upload gives way: memory stays bounded
    whatever the number of senders, and an upload that keeps moving survives."""
    uploads = sensor.server.uploads
    uploads.max_uploads = 3
    port = sensor.server.port
    mid = [0x5000]
    socks = [source(f"127.0.0.{n}") for n in range(2, 9)]
    try:
        moving, *others = socks
        assert (await send(port, block(0, True), moving, mid)).code == aiocoap.CONTINUE
        for number, sock in enumerate(others):
            assert (await send(port, block(0, True), sock, mid)).code == aiocoap.CONTINUE
            # The oldest of the others is the least recently continued; `moving` goes on.
            response = await send(port, block(number + 1, True), moving, mid)
            assert response.code == aiocoap.CONTINUE, number
            assert len(uploads) <= 3
        assert len(uploads) == 3
        # Pushed out: RFC 7959 §2.9.2, 4.08 Request Entity Incomplete.
        response = await send(port, block(1, True), others[0], mid)
        assert response.code == CoapCode.REQUEST_ENTITY_INCOMPLETE
        response = await send(port, block(1, True), others[-1], mid)
        assert response.code == aiocoap.CONTINUE
    finally:
        for sock in socks:
            sock.close()


async def test_many_source_addresses_cannot_reset_a_limited_address(limited: Coap) -> None:
    """Issue: a full table once cleared every counter, so a flood from many addresses gave a
    limited address its budget back. Now only keys under their limit give way."""
    clock = limited.service.clock
    clock.set(clock.now() - clock.now() % 60)
    limited.server.address_limits.max_keys = 4
    port = limited.server.port
    mid = [0x6000]
    probe = {AceParam.CLIENT_ID: "nobody"}

    def post() -> aiocoap.Message:
        message = aiocoap.Message(
            code=aiocoap.POST, uri_path=("token",), payload=cbor2.dumps(probe)
        )
        message.opt.content_format = ContentFormat.ACE_CBOR
        return message

    with source("127.0.0.1") as victim:
        for _ in range(7):
            response = await send(port, post(), victim, mid)
            assert response.code == CoapCode.UNAUTHORIZED
        assert (await send(port, post(), victim, mid)).code == CoapCode.TOO_MANY_REQUESTS
        for n in range(2, 12):  # ten more addresses than the table holds
            with source(f"127.0.0.{n}") as other:
                response = await send(port, post(), other, mid)
                assert response.code == CoapCode.UNAUTHORIZED  # room made among the newcomers
        assert len(limited.server.address_limits) == 4
        assert (await send(port, post(), victim, mid)).code == CoapCode.TOO_MANY_REQUESTS
        clock.advance(60)  # a new window: the finished counters make room again
        assert (await send(port, post(), victim, mid)).code == CoapCode.UNAUTHORIZED
