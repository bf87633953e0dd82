"""ResourceClient over real UDP: both ACE OSCORE profiles set up a context and make protected
requests; the context is set up again when the RS forgets it or the token changes; bad
answers abort; cancellation propagates and leaves nothing behind.

The RS and the AS here are test doubles of their wire contracts (issue 15's design), built
from the real pieces (aiocoap server, coap_auth.secure's ProtectedSite, ContextTable,
derive_context, lakers-python's EDHOC responder): the real RS (device_client/rs.py) and AS are
being built at the same time; the end-to-end tests with them come with those. Tokens are
opaque random bytes the two doubles share a registry of.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import resource

from coap_auth.clock import SettableClock
from coap_auth.coap.server import _bound_port
from coap_auth.secure.ace_oscore import derive_context, new_nonce
from coap_auth.secure.contexts import MASTER_SALT_BYTES, MASTER_SECRET_BYTES, ContextTable
from coap_auth.secure.credentials import (
    EdhocCredential,
    PeerCredential,
    make_credential,
)
from coap_auth.secure.edhoc import MESSAGE_1_PREFIX, _decode_connection_id
from coap_auth.secure.site import ProtectedSite
from coap_auth.tokens import cose_key_from_public, public_key_from_cose
from coap_auth.wire import EAD_ACCESS_TOKEN, AceParam, AceProfile, CnfMethod, ContentFormat
from device_client import (
    ChannelUnavailable,
    DeviceKey,
    ResourceClient,
    ResourceRefused,
    ResourceUnreachable,
    SecretCredentials,
    TokenClient,
    create_client_context,
    create_server_context,
)
from tests.conftest import SEEN_SECRETS
from tests.device_client.conftest import FAST_REFRESH
from tests.device_client.test_token_client_profiles import fake_as, oscore_material

AUDIENCE = "thermostat"
LIFETIME = 600
SHORT, LONG = 120, 300  # token sizes: in EAD_3, or posted to /authz-info first


@dataclass
class Issued:
    """What the AS double issued: what the RS double knows of a token by decrypting it."""

    profile: int
    sub: str
    exp: int
    material: dict[int, bytes] | None = field(default=None, repr=False)
    cnf_key: dict[Any, Any] | None = None


@dataclass
class World:
    """The AS double, the RS double, and what they share."""

    clock: SettableClock
    rs_key: DeviceKey
    issued: dict[bytes, Issued] = field(default_factory=dict)
    profile: int = AceProfile.COAP_OSCORE
    token_size: int = SHORT
    send_rs_cnf: bool = True
    as_base: str = ""
    rs_base: str = ""
    rs: RsDouble | None = None
    cnf_key: Any = None
    contexts: list[aiocoap.Context] = field(default_factory=list)

    def lookup(self, token: bytes) -> Issued | None:
        """What the RS double learns from a token (here: the registry; with the real AS, by
        decrypting or verifying it)."""
        return self.issued.get(token)

    def answer(self, params: dict[Any, Any]) -> dict[Any, Any]:
        """/token of the AS double: a fresh token of `profile` (fresh material each time)."""
        token = secrets.token_bytes(self.token_size)
        SEEN_SECRETS.add(token)
        body: dict[Any, Any] = {
            AceParam.ACCESS_TOKEN: token,
            AceParam.EXPIRES_IN: LIFETIME,
            AceParam.TOKEN_TYPE: 2,
            AceParam.ACE_PROFILE: self.profile,
            AceParam.REFRESH_TOKEN: secrets.token_bytes(32),
        }
        client_id = "meter-7"
        if self.profile == AceProfile.COAP_OSCORE:
            material = oscore_material()
            body[AceParam.CNF] = {CnfMethod.OSC: material}
            self.issued[token] = Issued(
                self.profile, client_id, self.clock.now() + LIFETIME, material
            )
        elif self.profile == AceProfile.COAP_EDHOC_OSCORE:
            # A refresh keeps the family's key (it carries no req_cnf).
            if AceParam.REQ_CNF in params:
                self.cnf_key = params[AceParam.REQ_CNF][CnfMethod.COSE_KEY]
            cnf_key = self.cnf_key
            body[AceParam.CNF] = {CnfMethod.COSE_KEY: cnf_key}
            if self.send_rs_cnf:
                rs_cnf = cose_key_from_public(self.rs_key.private_key.public_key())
                body[AceParam.RS_CNF] = {CnfMethod.COSE_KEY: rs_cnf}
            self.issued[token] = Issued(
                self.profile, client_id, self.clock.now() + LIFETIME, cnf_key=cnf_key
            )
        return body

    async def tokens(self, key: DeviceKey | None = None) -> TokenClient:
        context = await create_client_context()
        self.contexts.append(context)
        credentials = key or SecretCredentials("meter-7", "s" * 32)
        return TokenClient(
            context,
            self.as_base,
            credentials,
            audience=AUDIENCE,
            clock=self.clock,
            policy=FAST_REFRESH,
            pop_key=key.private_key.public_key() if key is not None else None,
        )

    async def client(self, key: DeviceKey | None = None, **options: Any) -> ResourceClient:
        tokens = await self.tokens(key)
        options.setdefault("timeout", 2.0)
        return ResourceClient(
            tokens.context, options.pop("rs_uri", self.rs_base), tokens, **options
        )


class RsDouble:
    """The RS side of both profiles, as small as it gets: /authz-info (RFC 9203 exchange,
    raw token upload, updates over OSCORE), /.well-known/edhoc taking the token from EAD_3 or
    from an upload, and /temperature for protected requests only."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.contexts = ContextTable(world.clock.now, max_contexts=16, idle_timeout=3600)
        self.identity = world.rs_key.edhoc_identity()
        self.bound: dict[bytes, bytes] = {}  # recipient id -> token
        self.held: dict[str, bytes] = {}  # subject -> uploaded EDHOC-profile token
        self.pending: dict[bytes, tuple[Any, bytes]] = {}  # C_R -> (responder, C_I)
        self.authz_info: list[tuple[int | None, bool, Any]] = []  # (ct, protected, body)
        self.ead_tokens: list[bytes] = []
        self.served: list[tuple[str, bytes]] = []  # (method, token) of protected requests
        self.refuse: set[bytes] = set()  # tokens /authz-info answers 4.01
        self.refuse_all = False
        self.amnesiac = False  # derive, answer 2.01, but keep no context
        self.echo_id1 = False  # answer ID2 = ID1 (RFC 9203 §4.2 forbids it)
        self.answer_override: bytes | None = None
        self.refuse_message_1 = False  # answer message_1 with an EDHOC error

    def site(self) -> ProtectedSite:
        site = resource.Site()
        site.add_resource(["authz-info"], _Call(self.authz))
        site.add_resource([".well-known", "edhoc"], _Call(self.edhoc))
        site.add_resource(["temperature"], _Call(self.temperature))
        return ProtectedSite(site, self.contexts, self.world.clock)

    async def authz(self, request: aiocoap.Message) -> aiocoap.Message:
        context = getattr(request.remote, "security_context", None)
        ct = request.opt.content_format
        if ct == ContentFormat.ACE_CBOR:
            body = cbor2.loads(request.payload)
            self.authz_info.append((ct, context is not None, body))
            token = body[AceParam.ACCESS_TOKEN]
            issued = self.world.lookup(token)
            if issued is None or token in self.refuse or self.refuse_all:
                return aiocoap.Message(code=aiocoap.UNAUTHORIZED)
            if context is not None:  # update of access rights (RFC 9203 §4.1)
                self.bound[context.recipient_id] = token
                return aiocoap.Message(code=aiocoap.CREATED)
            nonce1, id1 = body[AceParam.NONCE1], body[AceParam.ACE_CLIENT_RECIPIENTID]
            nonce2 = new_nonce()
            if self.answer_override is not None:
                return aiocoap.Message(
                    code=aiocoap.CREATED,
                    payload=self.answer_override,
                    content_format=ContentFormat.ACE_CBOR,
                )
            if self.echo_id1:
                id2 = id1
            else:
                id2 = self.contexts.unused_id(lambda _: False, avoid=id1)
                assert issued.material is not None
                oscore = derive_context(
                    issued.material,
                    nonce1,
                    nonce2,
                    sender_id=id1,
                    recipient_id=id2,
                    peer=PeerCredential(issued.sub, None),
                )
                if not self.amnesiac:
                    self.contexts.add(oscore)
                self.bound[id2] = token
            return aiocoap.Message(
                code=aiocoap.CREATED,
                payload=cbor2.dumps(
                    {AceParam.NONCE2: nonce2, AceParam.ACE_SERVER_RECIPIENTID: id2}
                ),
                content_format=ContentFormat.ACE_CBOR,
            )
        token = bytes(request.payload)
        self.authz_info.append((ct, context is not None, token))
        issued = self.world.lookup(token)
        if issued is None or issued.cnf_key is None or token in self.refuse:
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED)
        if context is not None:  # update: the same client key (draft -11 §4.6.1)
            assert context.peer.credential.same_key(issued.cnf_key)
            self.bound[context.recipient_id] = token
        else:
            self.held[issued.sub] = token
        return aiocoap.Message(code=aiocoap.CREATED)

    async def edhoc(self, request: aiocoap.Message) -> aiocoap.Message:
        import lakers

        payload = bytes(request.payload)
        if payload.startswith(MESSAGE_1_PREFIX) and self.refuse_message_1:
            return aiocoap.Message(
                code=aiocoap.BAD_REQUEST,
                payload=cbor2.dumps(1) + cbor2.dumps("no"),
                content_format=ContentFormat.EDHOC_CBOR_SEQ,
            )
        if payload.startswith(MESSAGE_1_PREFIX):
            responder = lakers.EdhocResponder(
                r=self.identity.private_scalar, cred_r=self.identity.credential.ccs
            )
            c_i, _ = responder.process_message_1(payload[len(MESSAGE_1_PREFIX) :])
            c_r = self.contexts.unused_id(lambda cid: cid in self.pending, avoid=bytes(c_i))
            message_2 = responder.prepare_message_2(
                lakers.CredentialTransfer.ByReference, c_r, None
            )
            self.pending[c_r] = (responder, bytes(c_i))
            return aiocoap.Message(code=aiocoap.CHANGED, payload=bytes(message_2))
        stream = io.BytesIO(payload)
        c_r = _decode_connection_id(cbor2.CBORDecoder(stream).decode())
        responder, c_i = self.pending.pop(c_r)
        id_cred_i, ead_3 = responder.parse_message_3(stream.read())
        subject = cbor2.loads(bytes(id_cred_i))[4].decode()  # by reference: {4: kid}
        items = [i for i in ead_3 or () if i.label() == EAD_ACCESS_TOKEN]
        if items:
            assert len(items) == 1 and items[0].is_critical()
            token = bytes(items[0].value())
            self.ead_tokens.append(token)
        else:
            token = self.held.pop(subject)
        issued = self.world.lookup(token)
        assert issued is not None
        if token in self.refuse:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST, payload=cbor2.dumps(1))
        credential = make_credential(issued.sub, public_key_from_cose(issued.cnf_key))  # type: ignore[arg-type]
        responder.verify_message_3(credential.ccs)
        responder.completed_without_message_4()
        from coap_auth.secure.contexts import OscoreContext

        oscore = OscoreContext(
            bytes(responder.edhoc_exporter(0, [], MASTER_SECRET_BYTES)),
            bytes(responder.edhoc_exporter(1, [], MASTER_SALT_BYTES)),
            sender_id=c_i,
            recipient_id=c_r,
            peer=PeerCredential(issued.sub, credential),
        )
        self.contexts.add(oscore)
        self.bound[c_r] = token
        return aiocoap.Message(code=aiocoap.CHANGED)

    async def temperature(self, request: aiocoap.Message) -> aiocoap.Message:
        context = getattr(request.remote, "security_context", None)
        token = None if context is None else self.bound.get(context.recipient_id)
        if token is None:
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED)
        self.served.append((str(request.code), token))
        if request.code == aiocoap.PUT:
            return aiocoap.Message(code=aiocoap.CHANGED)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=b"21.5")

    def forget(self) -> None:
        """As after a restart: no context survives."""
        self.contexts.close()
        self.bound.clear()


class _Call(resource.Resource):
    def __init__(self, handler: Any) -> None:
        super().__init__()
        self.handler = handler

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self.handler(request)  # type: ignore[no-any-return]


@pytest.fixture
async def world(clock: SettableClock) -> AsyncIterator[World]:
    world = World(clock, DeviceKey.generate(AUDIENCE))
    async with fake_as(world.answer) as (as_base, _):
        world.as_base = as_base
        async with serving_rs_double(world):
            yield world


@asynccontextmanager
async def serving_rs_double(world: World) -> AsyncIterator[World]:
    """`world` with an RsDouble serving on 127.0.0.1 (world.rs, world.rs_base); at the end,
    every client context of the world and the RS's shut down."""
    world.rs = RsDouble(world)
    # The OSCORE option is processed by ProtectedSite, not by the guard in front of it.
    rs_context = await create_server_context(world.rs.site(), ("127.0.0.1", 0), check_options=False)
    world.rs_base = f"coap://127.0.0.1:{_bound_port(rs_context)}"
    try:
        yield world
    finally:
        for context in world.contexts:
            await context.shutdown()
        await rs_context.shutdown()


def _rs(world: World) -> RsDouble:
    assert world.rs is not None
    return world.rs


# -- both profiles set up a context; requests go protected ----------------------------------


async def test_oscore_profile_posts_the_token_derives_and_sends_protected(world: World) -> None:
    rs = _rs(world)
    async with await world.client() as client:
        answer = await client.request(aiocoap.GET, "temperature")
        assert answer.code == aiocoap.CONTENT and answer.payload == b"21.5"
        assert (await client.request(aiocoap.PUT, "/temperature", b"22")).code == aiocoap.CHANGED
        assert client.handshakes == 1 and client.established
        token = client.token
        assert token is not None and token.profile == AceProfile.COAP_OSCORE
    assert not client.established
    [(ct, protected, body)] = rs.authz_info
    assert ct == ContentFormat.ACE_CBOR and not protected
    assert set(body) == {AceParam.ACCESS_TOKEN, AceParam.NONCE1, AceParam.ACE_CLIENT_RECIPIENTID}
    assert body[AceParam.ACCESS_TOKEN] == token.value and len(body[AceParam.NONCE1]) == 8
    assert rs.served == [("GET", token.value), ("PUT", token.value)]


async def test_edhoc_profile_carries_a_short_token_in_ead_3(world: World) -> None:
    world.profile, world.token_size = AceProfile.COAP_EDHOC_OSCORE, SHORT
    rs = _rs(world)
    async with await world.client(DeviceKey.generate("meter-7")) as client:
        assert (await client.request(aiocoap.GET, "temperature")).payload == b"21.5"
        token = client.token
    assert token is not None and rs.ead_tokens == [token.value]
    assert rs.authz_info == []  # draft -11: the first token only in EAD_3
    assert rs.served == [("GET", token.value)]


async def test_a_token_is_never_posted_to_an_rs_that_has_not_authenticated(
    world: World,
) -> None:
    """Anyone can answer message_1 with an EDHOC error: that is no reason to upload the token
    in the clear (review of issue 15); only a refused message_3, from an RS that proved its
    credential in message_2, is."""
    world.profile, world.token_size = AceProfile.COAP_EDHOC_OSCORE, SHORT
    rs = _rs(world)
    rs.refuse_message_1 = True
    async with await world.client(DeviceKey.generate("meter-7")) as client:
        with pytest.raises(ResourceRefused) as refused:
            await client.request(aiocoap.GET, "temperature")
    assert not refused.value.at_message_3
    assert rs.authz_info == [] and rs.ead_tokens == []


async def test_edhoc_profile_posts_a_long_token_before_edhoc(world: World) -> None:
    world.profile, world.token_size = AceProfile.COAP_EDHOC_OSCORE, LONG
    rs = _rs(world)
    async with await world.client(DeviceKey.generate("meter-7")) as client:
        assert (await client.request(aiocoap.GET, "temperature")).payload == b"21.5"
        token = client.token
    assert token is not None and rs.ead_tokens == []
    assert rs.authz_info == [(ContentFormat.CWT, False, token.value)]
    assert rs.served == [("GET", token.value)]


async def test_a_provisioned_rs_credential_stands_in_for_rs_cnf(world: World) -> None:
    world.profile, world.send_rs_cnf = AceProfile.COAP_EDHOC_OSCORE, False
    key = DeviceKey.generate("meter-7")
    async with await world.client(key) as client:
        with pytest.raises(ChannelUnavailable, match="rs_credential"):
            await client.request(aiocoap.GET, "temperature")
        assert not client.established
    credential = world.rs_key.edhoc_identity().credential
    async with await world.client(key, rs_credential=credential) as client:
        assert (await client.request(aiocoap.GET, "temperature")).code == aiocoap.CONTENT

    # A credential the RS cannot prove: EDHOC fails, naming the host.
    impostor: EdhocCredential = DeviceKey.generate(AUDIENCE).edhoc_identity().credential
    async with await world.client(key, rs_credential=impostor) as client:
        with pytest.raises(ResourceRefused, match=client.host) as refused:
            await client.request(aiocoap.GET, "temperature")
        assert refused.value.host == client.host


async def test_a_key_other_than_the_tokens_is_refused_before_edhoc(world: World) -> None:
    world.profile = AceProfile.COAP_EDHOC_OSCORE
    tokens = await world.tokens(DeviceKey.generate("meter-7"))
    other = DeviceKey.generate("meter-7")
    async with ResourceClient(tokens.context, world.rs_base, tokens, key=other) as client:
        with pytest.raises(ChannelUnavailable, match="another key"):
            await client.request(aiocoap.GET, "temperature")
    assert _rs(world).ead_tokens == []


# -- set up again: the RS forgot, the token changed -----------------------------------------


@pytest.mark.parametrize(
    ("profile", "size"),
    [
        (AceProfile.COAP_OSCORE, SHORT),
        (AceProfile.COAP_EDHOC_OSCORE, SHORT),
        (AceProfile.COAP_EDHOC_OSCORE, LONG),
    ],
)
async def test_a_context_the_rs_forgot_is_set_up_again_once(
    world: World, profile: int, size: int
) -> None:
    world.profile, world.token_size = profile, size
    rs = _rs(world)
    async with await world.client(DeviceKey.generate("meter-7")) as client:
        await client.request(aiocoap.GET, "temperature")
        rs.forget()  # its answer to our next request: 4.01, unprotected
        answer = await client.request(aiocoap.PUT, "temperature", b"23")
        assert answer.code == aiocoap.CHANGED and client.handshakes == 2
        token = client.token
    assert token is not None
    # The same token both times; the refused PUT was not served, the resent one was.
    assert rs.served == [("GET", token.value), ("PUT", token.value)]


async def test_a_refreshed_token_gets_a_new_context(world: World, clock: SettableClock) -> None:
    rs = _rs(world)
    async with await world.client() as client:
        await client.request(aiocoap.GET, "temperature")
        first = client.token
        assert first is not None
        clock.advance(first.refresh_at - clock.now())  # due: TokenClient refreshes
        await client.request(aiocoap.GET, "temperature")
        second = client.token
        assert second is not None and second.value != first.value and client.handshakes == 2
        await client.tokens.refresh_now()  # rotated by the device itself
        await client.request(aiocoap.GET, "temperature")
        third = client.token
        assert third is not None and third.value != second.value and client.handshakes == 3
    assert [token for _, token in rs.served] == [first.value, second.value, third.value]


async def test_a_token_the_rs_refuses_is_replaced_once(world: World) -> None:
    rs = _rs(world)
    async with await world.client() as client:
        await client.establish()
        first = client.token
        assert first is not None
        rs.forget()
        rs.refuse.add(first.value)  # revoked meanwhile: /authz-info answers 4.01
        assert (await client.request(aiocoap.GET, "temperature")).code == aiocoap.CONTENT
        assert client.token is not None and client.token.value != first.value
        # A refusal of the new token too is an error, not a loop.
        rs.forget()
        rs.refuse_all = True
        with pytest.raises(ResourceRefused, match="4.01") as refused:
            await client.request(aiocoap.GET, "temperature")
    assert refused.value.coap_code == int(aiocoap.UNAUTHORIZED)
    assert refused.value.host == client.host


async def test_update_token_keeps_the_edhoc_context(world: World) -> None:
    world.profile = AceProfile.COAP_EDHOC_OSCORE
    rs = _rs(world)
    async with await world.client(DeviceKey.generate("meter-7")) as client:
        await client.request(aiocoap.GET, "temperature")
        await client.tokens.refresh_now()
        new = await client.update_token()
        assert client.token is new and client.handshakes == 1
        await client.request(aiocoap.GET, "temperature")
        assert client.handshakes == 1
    assert rs.authz_info == [(ContentFormat.CWT, True, new.value)]
    assert rs.served[-1] == ("GET", new.value)


async def test_update_token_over_the_oscore_profile_context(world: World) -> None:
    rs = _rs(world)
    async with await world.client() as client:
        with pytest.raises(ResourceRefused, match="no security context"):
            await client.update_token()
        await client.request(aiocoap.GET, "temperature")
        current = client.token
        assert current is not None
        assert await client.update_token() is current  # posted again, same token
    ct, protected, body = rs.authz_info[-1]
    assert (ct, protected, body) == (ContentFormat.ACE_CBOR, True, {1: current.value})


async def test_concurrent_requests_share_one_setup(world: World) -> None:
    async with await world.client() as client:
        answers = await asyncio.gather(
            *(client.request(aiocoap.GET, "temperature") for _ in range(4))
        )
        assert {answer.code for answer in answers} == {aiocoap.CONTENT}
        assert client.handshakes == 1
    assert len(_rs(world).authz_info) == 1


async def test_an_rs_that_refuses_the_new_context_too_is_an_error(world: World) -> None:
    rs = _rs(world)
    rs.amnesiac = True
    async with await world.client() as client:
        with pytest.raises(ResourceRefused, match="unprotected under the security context") as e:
            await client.request(aiocoap.GET, "temperature")
        assert e.value.host == client.host and e.value.coap_code == int(aiocoap.UNAUTHORIZED)
        assert client.handshakes == 2 and not client.established  # set up again once, no more
    assert rs.served == []


# -- bad answers abort ------------------------------------------------------------------------


async def test_id2_equal_to_id1_aborts(world: World) -> None:
    rs = _rs(world)
    rs.echo_id1 = True
    async with await world.client() as client:
        with pytest.raises(ResourceRefused, match="recipient id") as refused:
            await client.request(aiocoap.GET, "temperature")
        assert refused.value.host == client.host and not client.established
    assert rs.served == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({AceParam.NONCE2: b"short", AceParam.ACE_SERVER_RECIPIENTID: b"\x01"}, "nonce2"),
        ({AceParam.ACE_SERVER_RECIPIENTID: b"\x01"}, "nonce2"),
        ({AceParam.NONCE2: bytes(8), AceParam.ACE_SERVER_RECIPIENTID: bytes(8)}, "recipientid"),
        ({AceParam.NONCE2: bytes(8), AceParam.ACE_SERVER_RECIPIENTID: "x"}, "recipientid"),
        ([1, 2], "not a CBOR map"),
    ],
)
async def test_ill_formed_authz_info_answers_abort(world: World, body: Any, why: str) -> None:
    _rs(world).answer_override = cbor2.dumps(body)
    async with await world.client() as client:
        with pytest.raises(ResourceRefused, match=why):
            await client.request(aiocoap.GET, "temperature")
        assert not client.established


async def test_a_token_without_an_oscore_profile_is_refused_before_sending(world: World) -> None:
    world.profile = 1  # coap_dtls
    async with await world.client() as client:
        with pytest.raises(ChannelUnavailable, match="coap_dtls"):
            await client.request(aiocoap.GET, "temperature")
    assert _rs(world).authz_info == []


# -- cancellation and silence -------------------------------------------------------------


@pytest.mark.parametrize("profile", [AceProfile.COAP_OSCORE, AceProfile.COAP_EDHOC_OSCORE])
async def test_cancellation_during_setup_propagates_and_leaves_no_task(
    world: World, profile: int
) -> None:
    world.profile = profile
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # binds, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        uri = f"coap://127.0.0.1:{silent.getsockname()[1]}"
        key = DeviceKey.generate("meter-7")
        client = await world.client(key, rs_uri=uri, timeout=30)
        await client.tokens.token()  # the AS double answers; the RS does not
        before = asyncio.all_tasks()
        task = asyncio.create_task(client.request(aiocoap.GET, "temperature"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert asyncio.all_tasks() == before
        assert not client.established
        # The lock was released: the next attempt runs (and fails on its own timeout,
        # naming the host).
        setup = asyncio.create_task(client.establish())
        await asyncio.sleep(0.1)
        assert not setup.done()
        setup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await setup
        impatient = ResourceClient(client.tokens.context, uri, client.tokens, key=key, timeout=0.2)
        with pytest.raises(ResourceUnreachable, match="127.0.0.1") as silence:
            await impatient.request(aiocoap.GET, "temperature")
        assert silence.value.host == impatient.host
        assert asyncio.all_tasks() == before
        await client.close()
    finally:
        silent.close()


async def test_a_context_without_oscore_transport_is_refused(world: World) -> None:
    tokens = await world.tokens()
    bare = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        with pytest.raises(ChannelUnavailable, match="OSCORE transport"):
            ResourceClient(bare, world.rs_base, tokens)
    finally:
        await bare.shutdown()


async def test_a_token_refused_in_ead_3_is_replaced_not_uploaded(world: World) -> None:
    """An EDHOC error to message_3 is not authenticated: a forged one must not make the device
    post its token in the clear (outsider round 2). The refusal counts as the token's: one new
    token from the AS, in EAD_3 again."""
    world.profile, world.token_size = AceProfile.COAP_EDHOC_OSCORE, SHORT
    rs = _rs(world)
    async with await world.client(DeviceKey.generate("meter-7")) as client:
        await client.establish()
        first = client.token
        assert first is not None
        rs.forget()
        rs.refuse.add(first.value)  # revoked meanwhile: EDHOC error 1 to message_3
        assert (await client.request(aiocoap.GET, "temperature")).code == aiocoap.CONTENT
        second = client.token
    assert second is not None and second.value != first.value
    assert rs.authz_info == []  # never uploaded
    assert rs.ead_tokens == [first.value, first.value, second.value]
