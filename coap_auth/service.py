"""The use cases of the authorization server: authenticate clients, issue tokens, rotate keys.

Async and transport-free: the CoAP layer parses requests into these dataclasses and renders
what comes back. The clock is injected; nothing here sleeps.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.clock import Clock
from coap_auth.config import Settings
from coap_auth.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    MalformedToken,
    TokenError,
    UnsupportedGrantType,
    UnsupportedPopKey,
)
from coap_auth.keys import KeyRing, SigningKey
from coap_auth.store import (
    Audience,
    Client,
    IssuedAccess,
    MasterKey,
    RefreshFamily,
    Store,
)
from coap_auth.tokens import (
    Claims,
    alg_for_key,
    cose_key_from_public,
    decode_cose,
    encode_cwt,
    encode_jwt,
    public_key_from_cose,
    token_hash,
)
from coap_auth.tokens.cose import verify_sign1
from coap_auth.tokens.cwt import decode_claims
from coap_auth.wire import CnfMethod, CoseAlg, GrantType, TokenType

log = logging.getLogger("coap_auth.service")

CTI_BYTES = 8
CWT_TAG_PREFIX = b"\xd8\x3d"  # tag 61, shortest encoding
REFRESH_TOKEN_BYTES = 32
FAMILY_ID_BYTES = 16
# A retiring key stays published this long past the longest token lifetime.
ROTATION_LEEWAY = 60


@dataclass(frozen=True, slots=True)
class TokenRequest:
    grant_type: GrantType = GrantType.CLIENT_CREDENTIALS
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_assertion: bytes | None = field(default=None, repr=False)
    audience: str | None = None
    scope: str | None = None
    req_cnf: Mapping[Any, Any] | None = None
    refresh_token: bytes | None = field(default=None, repr=False)
    token_format: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: bytes = field(repr=False)
    expires_in: int
    token_type: TokenType
    claims: Claims
    # Set when the granted scope is narrower than the one requested (RFC 6749 §5.1).
    narrowed_scope: str | None = None
    cnf: Mapping[int, Any] | None = None
    refresh_token: bytes | None = field(default=None, repr=False)


class AuthService:
    def __init__(self, store: Store, master_key: MasterKey, settings: Settings, clock: Clock):
        self.store = store
        self.settings = settings
        self.clock = clock
        self._master_key = master_key
        self._ring: KeyRing | None = None
        # Compared against when the client id is unknown, so timing does not tell.
        self._dummy_digest = master_key.digest(secrets.token_bytes(32))
        self._dummy_public_key = ec.generate_private_key(ec.SECP256R1()).public_key()

    # -- keys ---------------------------------------------------------------------------------

    @property
    def key_ring(self) -> KeyRing:
        if self._ring is None:
            raise RuntimeError("keys not loaded: call load_keys() first")
        return self._ring

    async def load_keys(self) -> KeyRing:
        """Read the key ring from the store, creating the first keys on an empty store."""
        keys = await self.store.load_keys()
        if not keys:
            alg = CoseAlg.EDDSA if self.settings.signing_alg == "EdDSA" else CoseAlg.ES256
            ring = KeyRing.initial(alg, self.clock.now())
            await self.store.save_keys(ring.keys)
            keys = list(ring.keys)
        self._ring = KeyRing(tuple(keys))
        return self._ring

    async def rotate_keys(self) -> list[SigningKey]:
        """Rotate now: next becomes active, active retires, a new next key is published."""
        ring = await self.load_keys()
        max_lifetime = max(
            [a.lifetime for a in await self.store.list_audiences()] + [self.settings.token_lifetime]
        )
        ring, changed = ring.rotate(self.clock.now(), max_lifetime + ROTATION_LEEWAY)
        await self.store.save_keys(changed)
        self._ring = ring
        log.info("keys rotated: active kid %s", ring.active.kid.hex())
        return changed

    # -- /token -------------------------------------------------------------------------------

    async def issue_token(self, request: TokenRequest) -> IssuedToken:
        """The /token use case: a client_credentials grant or a refresh."""
        if request.grant_type == GrantType.REFRESH_TOKEN:
            return await self.refresh(request)
        if request.grant_type != GrantType.CLIENT_CREDENTIALS:
            raise UnsupportedGrantType("grant type not supported")
        client = await self.authenticate(request)
        audience = await self._audience_for(client, request.audience)
        scope, narrowed = self._grant_scope(client, request.scope)
        cnf = _pop_key(request.req_cnf)
        issued = self._mint(client.client_id, audience, scope, cnf, request.token_format)
        # Every grant starts a refresh family (RFC 9700 §4.14).
        refresh_token = secrets.token_bytes(REFRESH_TOKEN_BYTES)
        now = self.clock.now()
        family = RefreshFamily(
            family_id=secrets.token_bytes(FAMILY_ID_BYTES),
            client_id=client.client_id,
            audience=audience.audience_id,
            scope=scope,
            created_at=now,
            last_used_at=now,
            expires_at=now + self.settings.refresh_max_lifetime,
            cnf=dict(cnf) if cnf is not None else None,
        )
        await self.store.start_family(
            family, self._master_key.digest(refresh_token), _access_record(issued)
        )
        return replace(
            issued, narrowed_scope=scope if narrowed else None, refresh_token=refresh_token
        )

    async def refresh(self, request: TokenRequest) -> IssuedToken:
        """RFC 9200 §5.8.1 / RFC 9700 §4.14: rotate a refresh token, catching reuse."""
        if request.refresh_token is None:
            raise InvalidRequest("refresh_token required")
        client = await self.authenticate(request)
        cnf = _pop_key(request.req_cnf)
        # mint() runs inside the store's transaction and cannot await: look audiences up first.
        audiences = {a.audience_id: a for a in await self.store.list_audiences()}
        issued: list[IssuedToken] = []

        def mint(family: RefreshFamily) -> IssuedAccess:
            # RFC 9200 §5.8.1: a refresh may narrow the scope, never widen it or change
            # the audience or the key. Raising here rolls the refresh back.
            if request.audience is not None and request.audience != family.audience:
                raise InvalidGrant("refresh may not change the audience")
            if cnf is not None and dict(cnf) != family.cnf:
                raise InvalidGrant("refresh may not change the proof-of-possession key")
            family_scope = family.scope.split()
            wanted = request.scope.split() if request.scope else family_scope
            if not set(wanted) <= set(family_scope):
                raise InvalidGrant("refresh may not widen the scope")
            # The operator may have narrowed the client since the grant: follow that.
            if family.audience not in client.audiences or not set(wanted) <= set(client.scope):
                raise InvalidGrant("client no longer allowed this audience or scope")
            scope = " ".join(dict.fromkeys(wanted))
            audience = audiences.get(family.audience)
            if audience is None:
                raise InvalidGrant("audience no longer registered")
            token = self._mint(family.client_id, audience, scope, family.cnf, request.token_format)
            issued.append(replace(token, narrowed_scope=scope if wanted != family_scope else None))
            return _access_record(token)

        successor = secrets.token_bytes(REFRESH_TOKEN_BYTES)
        outcome = await self.store.rotate_refresh(
            self._master_key.digest(request.refresh_token),
            self._master_key.digest(successor),
            client_id=client.client_id,
            now=self.clock.now(),
            grace=self.settings.refresh_grace,
            idle_timeout=self.settings.refresh_idle_timeout,
            mint=mint,
        )
        if outcome.status == "reused":
            log.warning("refresh token reuse by %s: family killed", client.client_id)
            raise InvalidGrant("refresh token reused: its family is revoked")
        if outcome.status not in ("rotated", "grace"):
            raise InvalidGrant("refresh token invalid or expired")
        return replace(issued[0], refresh_token=successor)

    def _mint(
        self,
        client_id: str,
        audience: Audience,
        scope: str,
        cnf: Mapping[int, Any] | None,
        token_format: str | None,
    ) -> IssuedToken:
        now = self.clock.now()
        claims = Claims(
            iss=self.settings.issuer,
            sub=client_id,
            aud=audience.audience_id,
            exp=now + audience.lifetime,
            iat=now,
            cti=secrets.token_bytes(CTI_BYTES),
            scope=scope,
            cnf_key=cnf,
        )
        key = self.key_ring.active
        encode = encode_jwt if (token_format or audience.token_format) == "jwt" else encode_cwt
        return IssuedToken(
            access_token=encode(claims, key.private_key, key.alg, key.kid),
            expires_in=audience.lifetime,
            token_type=TokenType.POP if cnf is not None else TokenType.BEARER,
            claims=claims,
            cnf={CnfMethod.COSE_KEY: dict(cnf)} if cnf is not None else None,
        )

    async def authenticate(self, request: TokenRequest) -> Client:
        """Client authentication by signed assertion or by shared secret.

        Every failure is the same invalid_client: no answer tells whether a client id exists.
        """
        if request.client_assertion is not None:
            return await self._authenticate_assertion(request.client_assertion, request.client_id)
        if request.client_id is None or request.client_secret is None:
            raise InvalidClient("client authentication required")
        client = await self.store.get_client(request.client_id)
        expected = client.secret_digest if client and client.secret_digest else self._dummy_digest
        presented = self._master_key.digest(request.client_secret.encode("utf-8"))
        if not hmac.compare_digest(presented, expected) or client is None or client.disabled:
            raise InvalidClient("client authentication failed")
        return client

    def secret_digest(self, secret: str) -> bytes:
        return self._master_key.digest(secret.encode("utf-8"))

    async def _authenticate_assertion(self, assertion: bytes, client_id: str | None) -> Client:
        failed = InvalidClient("client authentication failed")
        try:
            # PROTOCOL.md: the assertion is a tagged CWT, 61(18(...)).
            if not assertion.startswith(CWT_TAG_PREFIX):
                raise MalformedToken("client assertion must be a tagged CWT")
            message = decode_cose(assertion)
            claims = decode_claims(message.payload)
        except TokenError:
            raise failed from None
        client = await self.store.get_client(claims.iss)
        known = client is not None and client.public_key is not None and not client.disabled
        # An unknown client costs a signature check too, so timing does not tell.
        public_key = (
            public_key_from_cose(client.public_key)  # type: ignore[union-attr, arg-type]
            if known
            else self._dummy_public_key
        )
        try:
            verify_sign1(message, public_key, alg_for_key(public_key))
        except TokenError:
            raise failed from None
        if not known or client is None:
            raise failed
        now = self.clock.now()
        skew = self.settings.clock_skew
        if (
            claims.sub != claims.iss
            or (client_id is not None and client_id != claims.iss)
            or claims.aud != self.settings.issuer
            or claims.exp <= now
            or claims.exp > now + self.settings.assertion_max_lifetime
            or claims.iat > now + skew
            or (claims.nbf is not None and claims.nbf > now + skew)
        ):
            raise failed
        # Only a verified assertion reaches the replay cache, so forgeries cannot fill it.
        if not await self.store.remember_assertion(client.client_id, claims.cti, claims.exp, now):
            raise InvalidClient("client assertion replayed")
        return client

    async def _audience_for(self, client: Client, requested: str | None) -> Audience:
        if requested is None:
            if len(client.audiences) != 1:
                raise InvalidRequest("audience required")
            requested = client.audiences[0]
        # RFC 8693 §2.2.2 would say invalid_target; ACE has no code for it, and the nearest
        # ACE code for "access this client may not have" is invalid_scope.
        audience = (
            await self.store.get_audience(requested) if requested in client.audiences else None
        )
        if audience is None:
            raise InvalidScope("audience not allowed for this client")
        return audience

    def _grant_scope(self, client: Client, requested: str | None) -> tuple[str, bool]:
        """Granted scope and whether it is narrower than the request (RFC 6749 §3.3)."""
        allowed = client.scope
        if requested is None:
            return " ".join(allowed), False
        wanted = requested.split()
        granted = [s for s in wanted if s in allowed]
        if not granted:
            raise InvalidScope("requested scope not allowed for this client")
        return " ".join(granted), len(granted) < len(dict.fromkeys(wanted))


def _pop_key(req_cnf: Mapping[Any, Any] | None) -> Mapping[int, Any] | None:
    """RFC 9200 §5.8.1 / RFC 8747 §3.1: req_cnf {1: COSE_Key} binds the token to that key."""
    if req_cnf is None:
        return None
    cose_key = req_cnf.get(CnfMethod.COSE_KEY) if len(req_cnf) == 1 else None
    if cose_key is None:
        raise UnsupportedPopKey("req_cnf must be {1: COSE_Key}")
    # Rebuilt from the parsed key: only kty, crv, x (and y) reach the token, whatever else
    # the client sent.
    return cose_key_from_public(public_key_from_cose(cose_key))


def _access_record(issued: IssuedToken) -> IssuedAccess:
    return IssuedAccess(token_hash(issued.access_token), issued.claims.sub, issued.claims.exp)
