"""A resource server for the tests: /authz-info and one guarded resource on a UDP endpoint of
its own, and a device that talks to it (shared by the RS, revocation, canonical-form and
profile tests)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import cbor2
from aiocoap import resource
from aiocoap.oscore import NotAProtectedMessage
from aiocoap.transports.oscore import OSCOREAddress
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.clock import SettableClock
from coap_auth.coap.server import _bound_port
from coap_auth.secure.ace_oscore import derive_context, new_nonce
from coap_auth.secure.contexts import OscoreContext
from coap_auth.secure.credentials import EdhocCredential, PeerCredential, make_credential
from coap_auth.secure.edhoc import establish
from coap_auth.tokens import Claims, VerificationKey, cose_key_from_public, encode_cwt
from coap_auth.tokens.cwt import encode_encrypted_cwt
from coap_auth.wire import EAD_ACCESS_TOKEN, CoseAlg
from device_client import (
    DeviceKey,
    KeySet,
    ResourceServer,
    TokenVerifier,
    create_client_context,
    require_scope,
)
from tests.conftest import SEEN_SECRETS

CF_CWT = 61  # docs/protocol.md, written out on purpose


class Temperature(resource.Resource):
    """GET needs temp:read, PUT temp:write."""

    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server  # where require_scope looks
        self.value = b"21.5"

    @require_scope("temp:read")
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.value)

    @require_scope("temp:write")
    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        self.value = request.payload
        return aiocoap.Message(code=aiocoap.CHANGED)


class WhoAmI(resource.Resource):
    """GET: the subject and profile of the token `token_for` finds for the request, or -."""

    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        token = self.resource_server.token_for(request)
        text = "-" if token is None else f"{token.claims.sub} {token.profile}"
        return aiocoap.Message(code=aiocoap.CONTENT, payload=text.encode())


@dataclass
class Thermostat:
    """A running resource server (`base`) and a device's CoAP context aimed at it."""

    base: str
    resource_server: ResourceServer
    device: aiocoap.Context

    async def send(
        self, method: aiocoap.Code, path: str, payload: bytes = b"", **options: object
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=method, uri=self.base + path, payload=payload, **options)
        return await self.device.request(message).response

    async def upload(self, token: bytes, content_format: int = CF_CWT) -> aiocoap.Message:
        return await self.send(aiocoap.POST, "/authz-info", token, content_format=content_format)


async def serve(
    resource_server: ResourceServer,
    resources: dict[str, resource.Resource],
    *,
    bearer: bool = True,
) -> tuple[str, int, aiocoap.Context]:
    """Serve /authz-info (/.well-known/edhoc with an RS identity) and `resources` (path ->
    resource) on 127.0.0.1, a free port, behind OSCORE. `bearer` turns the RS's allow_bearer
    on: the tests written before the OSCORE profiles exercise bearer tokens (theirs is the
    behaviour an RS configured for bearer audiences keeps); the profile tests pass False."""
    if bearer:
        resource_server.allow_bearer = True
    site = resource.Site()
    for path, item in resources.items():
        site.add_resource([path], item)
    # As examples/thermostat_rs.py does: the fixed UDP transport, OSCORE in front, 4.02 for
    # unknown critical options.
    context = await resource_server.serve(site, ("127.0.0.1", 0))
    port = _bound_port(context)
    return f"coap://127.0.0.1:{port}", port, context


# -- the OSCORE profiles (tests/device_client/test_rs_profiles*.py) --------------------------
# Tokens are minted in the tests with coap_auth.tokens under test keys: an AES-CCM-16-64-128
# key of the audience (exported as `coap-auth keys export` prints it) and an ES256 signing key.

# Short names: a token in EAD_3 must keep message_3 under 256 bytes (lakers-python 0.6,
# coap_auth.secure.edhoc MAX_CIPHERTEXT_3_BYTES), about 225 bytes of token at most.
ISSUER = "as"
AUDIENCE = "thermostat"
AES_KID = b"aes-1"
SIGN_KID = b"k1"
CF_ACE = 19


@dataclass
class Minter:
    """The AS's side, in the test: keys, and tokens minted with them at the clock's time."""

    clock: SettableClock
    aes_key: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    signing: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def exported(self) -> str:
        """The audience's AES family as `coap-auth keys export` prints it."""
        cose_key = {1: 4, 2: AES_KID, 3: 10, -1: self.aes_key}
        return base64.urlsafe_b64encode(cbor2.dumps([cose_key])).decode("ascii")

    def key_set(self) -> KeySet:
        published = VerificationKey(SIGN_KID, CoseAlg.ES256, self.signing.public_key())
        return KeySet((published,), encryption=KeySet.from_export(self.exported()).encryption)

    def claims(self, sub: str, scope: str, aud: str, lifetime: int, **cnf: Any) -> Claims:
        now = self.clock.now()
        return Claims(
            iss=ISSUER,
            sub=sub,
            aud=aud,
            exp=now + lifetime,
            iat=now,
            cti=secrets.token_bytes(8),
            scope=scope,
            **cnf,
        )

    def oscore_token(
        self,
        *,
        sub: str = "dev-1",
        scope: str = "temp:read",
        aud: str = AUDIENCE,
        lifetime: int = 600,
        material: dict[int, Any] | None = None,
        key: bytes | None = None,
    ) -> tuple[bytes, dict[int, Any]]:
        """An RFC 9203 token (encrypted CWT, cnf osc) and the material the client gets."""
        if material is None:
            material = {0: secrets.token_bytes(8), 2: secrets.token_bytes(16)}
            material[5] = secrets.token_bytes(8)
        claims = self.claims(sub, scope, aud, lifetime, cnf_osc=material)
        token = encode_encrypted_cwt(claims, key or self.aes_key, AES_KID)
        SEEN_SECRETS.update({token, material[2]})
        return token, material

    def pop_token(
        self,
        holder: DeviceKey,
        *,
        scope: str = "temp:read",
        aud: str = AUDIENCE,
        lifetime: int = 600,
        sub: str | None = None,
    ) -> bytes:
        """An EDHOC-profile token: signed CWT with cnf = the holder's public COSE_Key."""
        cnf_key = cose_key_from_public(holder.private_key.public_key())
        claims = self.claims(sub or holder.client_id, scope, aud, lifetime, cnf_key=cnf_key)
        token = encode_cwt(claims, self.signing, CoseAlg.ES256, SIGN_KID)
        SEEN_SECRETS.add(token)
        return token

    def bearer_token(self, *, sub: str = "dev-1", scope: str = "temp:read") -> bytes:
        token = encode_cwt(
            self.claims(sub, scope, AUDIENCE, 600), self.signing, CoseAlg.ES256, SIGN_KID
        )
        SEEN_SECRETS.add(token)
        return token


@dataclass
class ProfileRs:
    """A running RS with both profiles (no bearer tokens), its keys, and two devices."""

    base: str
    port: int
    resource_server: ResourceServer
    temperature: Temperature
    minter: Minter
    identity: DeviceKey
    victim: aiocoap.Context
    thief: aiocoap.Context

    @property
    def rs_credential(self) -> EdhocCredential:
        """How a client authenticates the RS: its audience id and key (rs_cnf)."""
        return make_credential(AUDIENCE, self.identity.private_key.public_key())  # type: ignore[arg-type]

    async def post(
        self, device: aiocoap.Context, path: str, payload: bytes, content_format: int
    ) -> aiocoap.Message:
        message = aiocoap.Message(
            code=aiocoap.POST, uri=self.base + path, payload=payload, content_format=content_format
        )
        return await device.request(message).response

    async def authz_info(
        self,
        device: aiocoap.Context,
        token: bytes,
        material: dict[int, Any],
        *,
        nonce1: bytes | None = None,
        id1: bytes = b"\x01",
    ) -> tuple[aiocoap.Message, OscoreContext | None]:
        """RFC 9203 §4.1: POST {1: token, 40: N1, 43: ID1}; derive the client's context
        (sender ID2, recipient ID1) from a 2.01."""
        nonce1 = new_nonce() if nonce1 is None else nonce1
        body = cbor2.dumps({1: token, 40: nonce1, 43: id1})
        response = await self.post(device, "/authz-info", body, CF_ACE)
        if response.code != aiocoap.CREATED:
            return response, None
        answer = cbor2.loads(response.payload)
        context = derive_context(
            material,
            nonce1,
            answer[42],
            sender_id=answer[44],
            recipient_id=id1,
            peer=PeerCredential(AUDIENCE, None),
        )
        return response, context

    async def edhoc(
        self, device: aiocoap.Context, holder: DeviceKey, token: bytes | None = None
    ) -> OscoreContext:
        """EDHOC as `holder` with the RS, the token in EAD_3 when given."""
        ead_3 = None if token is None else [(EAD_ACCESS_TOKEN, True, token)]
        return await establish(
            device, self.base, holder.edhoc_identity(), self.rs_credential, ead_3=ead_3
        )

    async def protected(
        self,
        device: aiocoap.Context,
        context: OscoreContext,
        method: aiocoap.Code,
        path: str,
        payload: bytes = b"",
        **options: Any,
    ) -> tuple[aiocoap.Message, bool]:
        """Send under `context`; the answer and whether it came protected (an unprotected
        4.01 says the RS no longer holds the context)."""
        message = aiocoap.Message(code=method, uri=self.base + path, payload=payload, **options)
        message.remote = OSCOREAddress(context, message.remote)
        try:
            return await device.request(message).response, True
        except NotAProtectedMessage as plain:
            return plain.plain_message, False


def minted_verifier(clock: SettableClock) -> tuple[Minter, TokenVerifier]:
    """A Minter and a verifier of its tokens (leeway 0 on `clock`), for a test RS."""
    minter = Minter(clock)
    key_set = minter.key_set()
    verifier = TokenVerifier(
        key_set,
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=clock,
        leeway=0,
        encryption_keys=key_set.encryption,
    )
    return minter, verifier


@asynccontextmanager
async def profile_rs(clock: SettableClock, **options: Any) -> AsyncIterator[ProfileRs]:
    """A ProfileRs on 127.0.0.1 (verifier with leeway 0 on `clock`); `options` go to the
    ResourceServer."""
    minter, verifier = minted_verifier(clock)
    identity = DeviceKey.generate(AUDIENCE)
    resource_server = ResourceServer(verifier, as_uri=ISSUER, identity=identity, **options)
    temperature = Temperature(resource_server)
    resources = {"temp": temperature, "whoami": WhoAmI(resource_server)}
    base, port, server = await serve(resource_server, resources, bearer=False)
    victim = await create_client_context()
    thief = await create_client_context()
    try:
        yield ProfileRs(base, port, resource_server, temperature, minter, identity, victim, thief)
    finally:
        await victim.shutdown()
        await thief.shutdown()
        await resource_server.close()  # the context `serve` made, and every security context
