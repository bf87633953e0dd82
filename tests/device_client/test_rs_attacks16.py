"""Outside attacks on device_client's resource server and device side (issue 16, second
round), each performed over real UDP from raw datagrams:

- Block1 uploads are bounded (RFC 7959 §2.9.3): a block reaching past the RS's upload cap
  gets 4.13 with Size1 before aiocoap holds any more of it, unprotected or as the inner
  request of an OSCORE one; /.well-known/edhoc takes no Block1 at all.
- A block that does not follow the ones held gets 4.08 (RFC 7959 §2.5) and a log line per
  minute, not aiocoap's traceback per datagram.
- A message_1 flood from unverified addresses cannot push out a real device's handshake: once
  half the responder's table is taken, message_1 from an unverified address meets the Echo
  challenge first, and a device that answers it still gets through.
- Two Echo challenges to message_3 are no refusal of the token: ResourceClient keeps it.
- A block-wise answer whose blocks' ETags differ leaves no "Task exception was never
  retrieved" traceback behind in a watcher.

Before the fixes: block 4 of 1 KiB (and a second BERT block) got 2.31 Continue, Block1 to
/.well-known/edhoc 2.31 too, each out-of-order block a 5.00 and an ERROR traceback; 300
spoofed message_1 left the device's message_3 with "no handshake in progress"; the second
Echo at message_3 cost the device its token (a second /token request); the watcher's failed
start left a stray task traceback.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiocoap
import lakers
import pytest
from aiocoap.optiontypes import BlockOption
from aiocoap.transports.oscore import OSCOREAddress

from coap_auth.clock import SettableClock
from coap_auth.secure.edhoc import MESSAGE_1_PREFIX, establish
from coap_auth.wire import EAD_ACCESS_TOKEN, AceProfile
from device_client import (
    DeviceKey,
    KeySetWatcher,
    ResourceRefused,
    ResourceServer,
    ServiceUnreachable,
    WatchPolicy,
    create_client_context,
)
from device_client.rs_amplification import EDHOC_MESSAGE_BYTES
from device_client.rs_common import MAX_TOKEN_BYTES
from tests.device_client.rs_site import ProfileRs, profile_rs
from tests.device_client.test_resource_client import SHORT, World, _rs, world  # noqa: F401

CF_CWT, CF_EDHOC = 61, 65
ANSWER_TIMEOUT = 2.0
_ids = itertools.count(1)


class Source:
    """One UDP socket bound to `host` (any 127/8 address is this machine's: each a source
    address the RS has not verified), talking to the RS at 127.0.0.1:`port`."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", port))
        self.answer_size = 0  # of the last answer, in bytes

    def close(self) -> None:
        self.sock.close()

    async def exchange(self, request: aiocoap.Message) -> aiocoap.Message:
        """`request` as one CON datagram (fresh message id and token); its answer."""
        number = next(_ids) & 0xFFFF
        request.mtype, request.mid, request.token = aiocoap.CON, number, number.to_bytes(2, "big")
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, request.encode())
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while True:
                datagram = await loop.sock_recv(self.sock, 4096)
                answer = aiocoap.Message.decode(datagram)
                if answer.token == request.token:
                    self.answer_size = len(datagram)
                    return answer


def block(
    path: tuple[str, ...],
    number: int,
    payload: bytes,
    *,
    szx: int = 6,
    more: bool = True,
    content_format: int = CF_CWT,
) -> aiocoap.Message:
    request = aiocoap.Message(
        code=aiocoap.POST, uri_path=path, payload=payload, content_format=content_format
    )
    request.opt.block1 = BlockOption.BlockwiseTuple(number, more, szx)
    return request


@pytest.fixture
async def rs(clock: SettableClock) -> AsyncIterator[ProfileRs]:
    # Loopback unverified: every test source is a stranger to the RS.
    async with profile_rs(clock, verified_networks=()) as running:
        yield running


# -- F2: Block1 uploads bounded --------------------------------------------------------------


async def test_a_block1_upload_past_the_cap_gets_4_13_with_size1(rs: ProfileRs) -> None:
    source = Source(rs.port)
    try:
        path = ("authz-info",)
        for number in range(4):  # 4 KiB: the largest token, still taken
            answer = await source.exchange(block(path, number, bytes(1024)))
            assert answer.code == aiocoap.CONTINUE, number
        for number in range(4, 8):
            answer = await source.exchange(block(path, number, bytes(1024)))
            assert answer.code == aiocoap.REQUEST_ENTITY_TOO_LARGE, number
            assert answer.opt.size1 == MAX_TOKEN_BYTES
            assert source.answer_size < 30
    finally:
        source.close()


async def test_a_bert_block_past_the_cap_gets_4_13(rs: ProfileRs) -> None:
    # szx 7 (BERT): a block carries several KiB and its number counts KiB (RFC 8323 §6).
    source = Source(rs.port)
    try:
        path = ("authz-info",)
        first = await source.exchange(block(path, 0, bytes(3072), szx=7))
        assert first.code == aiocoap.CONTINUE
        second = await source.exchange(block(path, 3, bytes(3072), szx=7))
        assert second.code == aiocoap.REQUEST_ENTITY_TOO_LARGE
        assert second.opt.size1 == MAX_TOKEN_BYTES
    finally:
        source.close()


async def test_block1_to_the_edhoc_resource_is_refused(rs: ProfileRs) -> None:
    source = Source(rs.port)
    try:
        request = block(
            (".well-known", "edhoc"),
            0,
            MESSAGE_1_PREFIX + bytes(15),
            szx=0,
            content_format=CF_EDHOC,
        )
        answer = await source.exchange(request)
        assert answer.code == aiocoap.REQUEST_ENTITY_TOO_LARGE
        assert answer.opt.size1 == EDHOC_MESSAGE_BYTES
        assert rs.resource_server.edhoc is not None
        assert rs.resource_server.edhoc.responder.pending == 0
    finally:
        source.close()


async def test_the_inner_block1_of_a_protected_request_is_bounded(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token(scope="temp:read temp:write")
    response, context = await rs.authz_info(rs.victim, token, material)
    assert response.code == aiocoap.CREATED and context is not None
    answers = []
    for number in range(6):
        message = aiocoap.Message(code=aiocoap.PUT, uri=rs.base + "/temp", payload=bytes(1024))
        message.opt.block1 = BlockOption.BlockwiseTuple(number, True, 6)
        message.remote = OSCOREAddress(context, message.remote)
        answer = await rs.victim.request(message, handle_blockwise=False).response
        answers.append(answer.code)
        if answer.code == aiocoap.REQUEST_ENTITY_TOO_LARGE:
            assert answer.opt.size1 == MAX_TOKEN_BYTES
    assert answers == [aiocoap.CONTINUE] * 4 + [aiocoap.REQUEST_ENTITY_TOO_LARGE] * 2
    assert rs.temperature.value == b"21.5"


async def test_the_upload_cap_can_be_raised_not_lowered(rs: ProfileRs) -> None:
    verifier = rs.resource_server.verifier
    with pytest.raises(ValueError, match="max_upload"):
        ResourceServer(verifier, max_upload=MAX_TOKEN_BYTES - 1)
    assert ResourceServer(verifier, max_upload=1 << 16).max_upload == 1 << 16


# -- F3: out-of-order blocks ------------------------------------------------------------------


async def test_out_of_order_blocks_get_4_08_and_no_traceback(
    rs: ProfileRs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    source = Source(rs.port)
    try:
        path = ("authz-info",)
        assert (await source.exchange(block(path, 0, bytes(16), szx=0))).code == aiocoap.CONTINUE
        caplog.clear()
        for _ in range(100):
            answer = await source.exchange(block(path, 2, bytes(16), szx=0))  # block 1 skipped
            assert answer.code == aiocoap.REQUEST_ENTITY_INCOMPLETE
    finally:
        source.close()
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert len(caplog.records) <= 2, [r.getMessage() for r in caplog.records]


# -- F5: message_1 floods ---------------------------------------------------------------------


def message_1() -> bytes:
    initiator = lakers.EdhocInitiator()
    return MESSAGE_1_PREFIX + bytes(initiator.prepare_message_1(c_i=b"\x05", ead_1=None))


async def flood(port: int, count: int, network: int = 3) -> list[aiocoap.Code]:
    """`count` message_1, each from an address of its own in 127.`network`/16; their codes."""
    payload = message_1()
    codes = []
    for i in range(count):
        source = Source(port, f"127.{network}.{i // 200}.{i % 200 + 1}")
        try:
            request = aiocoap.Message(
                code=aiocoap.POST, uri_path=(".well-known", "edhoc"), payload=payload
            )
            codes.append((await source.exchange(request)).code)
        finally:
            source.close()
    return codes


async def a_stranger_meets_the_echo(port: int) -> None:
    """A new address's message_1 is challenged; repeated with the Echo, it is answered."""

    def post() -> aiocoap.Message:
        return aiocoap.Message(
            code=aiocoap.POST, uri_path=(".well-known", "edhoc"), payload=message_1()
        )

    stranger = Source(port, "127.4.0.1")
    try:
        challenge = await stranger.exchange(post())
        assert challenge.code == aiocoap.UNAUTHORIZED and challenge.opt.echo is not None
        again = post()
        again.opt.echo = challenge.opt.echo
        answered = await stranger.exchange(again)
        assert answered.code == aiocoap.CHANGED and len(answered.payload) > 32
    finally:
        stranger.close()


class FloodBeforeMessage3:
    """The device's aiocoap context as `establish` uses it (`request`): before message_3 goes
    out, `attack()` runs (the flood arrives while the handshake is pending)."""

    def __init__(self, context: aiocoap.Context, attack: Callable[[], Awaitable[Any]]) -> None:
        self._context = context
        self._attack: Callable[[], Awaitable[Any]] | None = attack

    def request(self, message: aiocoap.Message) -> Any:
        if bytes(message.payload).startswith(MESSAGE_1_PREFIX) or self._attack is None:
            return self._context.request(message)
        attack, self._attack = self._attack, None
        return _After(attack, self._context, message)


class _After:
    observation = None

    def __init__(
        self, attack: Callable[[], Awaitable[Any]], context: aiocoap.Context, message: Any
    ) -> None:
        self.response = self._respond(attack, context, message)

    @staticmethod
    async def _respond(
        attack: Callable[[], Awaitable[Any]], context: aiocoap.Context, message: Any
    ) -> aiocoap.Message:
        await attack()
        return await context.request(message).response  # type: ignore[no-any-return]


async def test_a_message_1_flood_does_not_push_out_a_devices_handshake(rs: ProfileRs) -> None:
    server = rs.resource_server
    assert server.edhoc is not None and server.guard is not None
    responder = server.edhoc.responder
    device = DeviceKey.generate("dev-1")
    token = rs.minter.pop_token(device)
    codes: list[aiocoap.Code] = []

    async def attack() -> None:
        codes.extend(await flood(rs.port, 300))

    # The device's handshake is pending while 300 spoofed message_1 (18 KB) arrive.
    context = await establish(
        FloodBeforeMessage3(rs.victim, attack),
        rs.base,
        device.edhoc_identity(),
        rs.rs_credential,
        ead_3=[(EAD_ACCESS_TOKEN, True, token)],
    )
    reading, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert protected and reading.code == aiocoap.CONTENT
    # Half the table (128) taken, the device's first: the rest got the Echo challenge.
    half = responder.max_pending // 2
    assert codes.count(aiocoap.CHANGED) == half - 1
    assert codes.count(aiocoap.UNAUTHORIZED) == 300 - (half - 1)
    assert responder.pending == half - 1  # the device's handshake is done
    assert await flood(rs.port, 1, network=6) == [aiocoap.CHANGED]
    assert responder.under_pressure

    # Under pressure, a new address's message_1 is challenged; with the Echo it is answered.
    await a_stranger_meets_the_echo(rs.port)

    # A device still gets through during the flood: it answers the challenge itself.
    other = DeviceKey.generate("dev-2")
    challenges = server.guard.challenges
    second = await rs.edhoc(rs.thief, other, rs.minter.pop_token(other))
    assert server.guard.challenges == challenges + 1
    reading, protected = await rs.protected(rs.thief, second, aiocoap.GET, "/temp")
    assert protected and reading.code == aiocoap.CONTENT


async def test_message_1_is_rendered_at_once_below_half_the_table(rs: ProfileRs) -> None:
    server = rs.resource_server
    assert server.edhoc is not None and server.guard is not None
    codes = await flood(rs.port, 20, network=5)
    assert codes == [aiocoap.CHANGED] * 20
    assert server.guard.challenges == 0 and not server.edhoc.responder.under_pressure


# -- F6: Echo challenges at message_3 ---------------------------------------------------------


class EchoAtMessage3(asyncio.DatagramProtocol):
    """A relay in front of the RS double (someone on the path): it answers every message_3
    with a forged 4.01 + Echo, and passes everything else on."""

    def __init__(self, rs_port: int) -> None:
        self.rs_port = rs_port
        self.forge = True
        self.forged = 0
        self.device: Any = None
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None and self.upstream is not None
        self.device = addr
        message = aiocoap.Message.decode(data)
        edhoc = tuple(message.opt.uri_path) == (".well-known", "edhoc")
        if self.forge and edhoc and not bytes(message.payload).startswith(MESSAGE_1_PREFIX):
            self.forged += 1
            answer = aiocoap.Message(code=aiocoap.UNAUTHORIZED)
            answer.mtype, answer.mid, answer.token = aiocoap.ACK, message.mid, message.token
            answer.opt.echo = os.urandom(12)
            self.transport.sendto(answer.encode(), addr)
            return
        self.upstream.sendto(data)

    def answer(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.device)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: EchoAtMessage3) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.answer(data)


async def test_echo_challenges_to_message_3_do_not_cost_the_token(
    world: World,  # noqa: F811
) -> None:
    world.profile, world.token_size = AceProfile.COAP_EDHOC_OSCORE, SHORT
    rs = _rs(world)
    loop = asyncio.get_running_loop()
    rs_port = int(world.rs_base.rsplit(":", 1)[1])
    relay = EchoAtMessage3(rs_port)
    front, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    back, _ = await loop.create_datagram_endpoint(
        lambda: _Upstream(relay), remote_addr=("127.0.0.1", rs_port)
    )
    relay.upstream = back
    relay_base = f"coap://127.0.0.1:{front.get_extra_info('sockname')[1]}"
    try:
        client = await world.client(DeviceKey.generate("meter-7"), rs_uri=relay_base)
        async with client:
            with pytest.raises(ResourceRefused) as refused:
                await client.request(aiocoap.GET, "temperature")
            assert not refused.value.at_message_3
            assert relay.forged == 2  # message_3, and once more with the (forged) Echo
            kept = client.tokens.cached
            assert kept is not None and kept.value in world.issued
            assert len(world.issued) == 1  # one /token: the token was not thrown away
            assert rs.ead_tokens == []
            # The forger gone, the same token sets up the context.
            relay.forge = False
            reading = await client.request(aiocoap.GET, "temperature")
            assert reading.code == aiocoap.CONTENT
            assert client.token is kept and len(world.issued) == 1
            assert rs.ead_tokens == [kept.value]
    finally:
        front.close()
        back.close()


# -- F7: block-wise answers with inconsistent ETags -------------------------------------------


class ChangingBlocks(asyncio.DatagramProtocol):
    """A fake AS: every answer is a 16-byte block with more to come and an ETag of its own
    (RFC 7959 §2.4: the representation changed between blocks), never with Observe."""

    def __init__(self) -> None:
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        request = aiocoap.Message.decode(data)
        if not request.code.is_request():
            return
        self.requests += 1
        number = request.opt.block2.block_number if request.opt.block2 is not None else 0
        answer = aiocoap.Message(code=aiocoap.CONTENT, payload=bytes(16), content_format=0)
        answer.mtype, answer.mid, answer.token = aiocoap.ACK, request.mid, request.token
        answer.opt.block2 = BlockOption.BlockwiseTuple(number, True, 0)
        answer.opt.etag = self.requests.to_bytes(2, "big")
        self.transport.sendto(answer.encode(), addr)


async def test_changing_etags_leave_no_stray_task_traceback(
    clock: SettableClock, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    fake = ChangingBlocks()
    transport, _ = await loop.create_datagram_endpoint(lambda: fake, local_addr=("127.0.0.1", 0))
    context = await create_client_context()
    try:
        port = transport.get_extra_info("sockname")[1]
        policy = WatchPolicy(request_timeout=1.0, poll_interval=0.02)
        watcher = KeySetWatcher(context, f"coap://127.0.0.1:{port}", clock=clock, policy=policy)
        with pytest.raises(ServiceUnreachable, match="ResourceChanged"):
            await watcher.start()
        assert fake.requests == 2  # block 0, block 1: the ETags differ
        await asyncio.sleep(0.01)
        # asyncio logs "Task exception was never retrieved" when such a task is collected,
        # which the log records held here (one quotes the error, and so holds the request
        # and its task) put off past the test: so ask each task whether it would.
        runners = [
            task
            for task in gc.get_objects()
            if isinstance(task, asyncio.Task)
            and task.get_name().startswith("Blockwise runner")
            and f"127.0.0.1:{port}" in task.get_name()
        ]
        assert runners and all(task.done() for task in runners)
        assert not [task for task in runners if task._log_traceback]  # type: ignore[attr-defined]
        del runners, watcher
        gc.collect()
    finally:
        await context.shutdown()
        transport.close()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
