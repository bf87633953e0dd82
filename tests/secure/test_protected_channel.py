"""Issue 14: the AS's protected channel, shown over real UDP against the real server.

A device registered with its P-256 key runs EDHOC with the AS and gets its token over OSCORE,
with nothing readable on the wire; plain requests are refused by default; the caller is the
peer EDHOC authenticated, and a client_id that names someone else is refused.
"""

from __future__ import annotations

import aiocoap
import cbor2
import pytest
from aiocoap.oscore import NotAProtectedMessage

from coap_auth.coap.server import Server
from coap_auth.errors import ProtectionRequired
from coap_auth.wire import AceParam, ContentFormat, ProblemDetail
from tests.conftest import Coap
from tests.device_client.lossy_proxy import LossyProxy
from tests.raw_coap import exchange
from tests.secure.conftest import Protected


class RecordingProxy(LossyProxy):
    """A relay that keeps every datagram it carries, both ways."""

    def __init__(self, server: tuple[str, int]) -> None:
        super().__init__(server)
        self.seen: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append(data)
        super().datagram_received(data, addr)

    def _from_server(self, data: bytes, client: tuple[str, int]) -> None:
        self.seen.append(data)
        super()._from_server(data, client)


async def test_a_token_crosses_the_wire_unreadable(protected: Protected) -> None:
    proxy = await RecordingProxy(("127.0.0.1", protected.server.port)).start()
    try:
        device = await protected.device("sensor-1")
        device.base = proxy.uri
        await device.handshake()
        response, body = await device.post_ace(
            "/token", {AceParam.AUDIENCE: "thermostat", AceParam.SCOPE: "temp:read"}
        )
        assert response.code == aiocoap.CREATED, body
        token, refresh = body[AceParam.ACCESS_TOKEN], body[AceParam.REFRESH_TOKEN]
        claims = cbor2.loads(cbor2.loads(token).value.value[2])  # 61(18([p, u, payload, sig])
        wire = b"".join(proxy.seen)
        assert len(proxy.seen) >= 6  # message_1/2, C_R + message_3/2.04, the request/answer
        for secret in (token, refresh, token[-64:], claims[7]):  # the token, its signature, cti
            assert secret not in wire
        for readable in (b"thermostat", b"temp:read", b"sensor-1"):
            # The audience and scope asked for, and the device's id: all inside OSCORE.
            assert readable not in wire
    finally:
        proxy.close()


async def test_plain_requests_are_refused_by_default(protected: Protected) -> None:
    assert protected.service.settings.require_oscore is True
    plain = Coap(
        await aiocoap.Context.create_client_context(),
        protected.base,
        protected.server,
        protected.service,
    )
    try:
        secret = await plain.add_secret_client("old-sensor", ("thermostat",), "temp:read")
        for path, body in (
            ("/token", {AceParam.CLIENT_ID: "old-sensor", AceParam.CLIENT_SECRET: secret}),
            (
                "/revoke",
                {
                    AceParam.TOKEN: b"x" * 40,
                    AceParam.CLIENT_ID: "old-sensor",
                    AceParam.CLIENT_SECRET: secret,
                },
            ),
            ("/introspect", {AceParam.TOKEN: b"x" * 40}),
        ):
            # RFC 9200 §5.8.3: the ACE endpoints' errors are application/ace+cbor.
            response, error = await plain.post_ace(path, body)
            assert response.code == aiocoap.UNAUTHORIZED, path
            assert response.opt.content_format == ContentFormat.ACE_CBOR
            assert error[AceParam.ERROR] == 2  # invalid_client
            assert "OSCORE" in error[AceParam.ERROR_DESCRIPTION]
        # A plain block-wise upload is refused at its first block.
        first_block = aiocoap.Message(
            code=aiocoap.POST,
            uri_path=("token",),
            payload=b"\xa1" + b"\x00" * 31,
            content_format=ContentFormat.ACE_CBOR,
            block1=(0, True, 1),
        )
        response = await exchange(protected.server.port, first_block)
        assert response.code == aiocoap.UNAUTHORIZED
        trl = await plain.request(aiocoap.GET, "/revoke/trl")
        assert trl.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR
        # The request is tiny: the answer is compact (no text) to stay within 3x its size.
        assert cbor2.loads(trl.payload).get(ProblemDetail.TITLE) in (None, ProtectionRequired.title)
        observe = await plain.request(aiocoap.GET, "/revoke/trl", observe=0)
        assert observe.code == aiocoap.UNAUTHORIZED and observe.opt.observe is None
        assert trl.code == aiocoap.UNAUTHORIZED
        # Public data stays readable without protection.
        keys = await plain.request(aiocoap.GET, "/keys")
        assert keys.code == aiocoap.CONTENT
        core = await plain.request(aiocoap.GET, "/.well-known/core")
        assert b"</.well-known/edhoc>" in core.payload and b'rt="core.edhoc"' in core.payload
    finally:
        await plain.context.shutdown()


async def test_the_channel_is_the_caller(protected: Protected) -> None:
    device = await protected.device("sensor-1")
    await protected.device("sensor-2")
    await device.handshake()
    # No client_id, secret or assertion: the EDHOC peer is the caller.
    response, body = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
    assert response.code == aiocoap.CREATED
    # Its own id is fine; another's is invalid_client, even over its own channel.
    response, body = await device.post_ace(
        "/token", {AceParam.CLIENT_ID: "sensor-1", AceParam.AUDIENCE: "thermostat"}
    )
    assert response.code == aiocoap.CREATED
    response, body = await device.post_ace(
        "/token", {AceParam.CLIENT_ID: "sensor-2", AceParam.AUDIENCE: "thermostat"}
    )
    assert response.code == aiocoap.UNAUTHORIZED
    assert body[AceParam.ERROR] == 2  # invalid_client
    # A disabled client loses the use of its open context at once.
    await protected.service.store.disable_client(
        "sensor-1", protected.service.clock.now(), "operator"
    )
    response, body = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
    assert response.code == aiocoap.UNAUTHORIZED
    assert body[AceParam.ERROR] == 2


async def test_an_unregistered_key_gets_no_context(protected: Protected) -> None:
    stranger = await protected.device("sensor-9", register=False)
    try:
        await stranger.handshake()
    except Exception as error:  # noqa: BLE001
        assert "EDHOC error 1" in str(error) and "127.0.0.1" in str(error)
    else:
        raise AssertionError("EDHOC with an unregistered key succeeded")
    assert len(protected.server.contexts) == 0
    assert protected.server.edhoc.pending == 0


async def test_a_restarted_as_is_recovered_by_a_new_handshake(protected: Protected) -> None:
    device = await protected.device("sensor-1")
    await device.handshake()
    response, _ = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
    assert response.code == aiocoap.CREATED
    credential = protected.service.edhoc_identity.credential
    port = protected.server.port
    await protected.server.stop()
    protected.server = Server(protected.service, "127.0.0.1", port)
    await protected.server.start()
    device.server = protected.server
    # The old context is gone with the process: the request fails, no answer is readable.
    with pytest.raises(NotAProtectedMessage) as gone:  # the AS's 4.01 cannot be protected
        await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
    assert gone.value.plain_message.code == aiocoap.UNAUTHORIZED
    # Same AS credential (derived from the master key), a new handshake, and on it goes.
    assert protected.service.edhoc_identity.credential == credential
    await device.handshake()
    response, _ = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
    assert response.code == aiocoap.CREATED
