"""The use cases of the authorization server: issue, refresh, revoke, introspect, rotate.

Async and transport-free: the CoAP layer parses requests into these dataclasses and renders
what comes back. The clock is injected; nothing here sleeps.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
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
    TokenError,
    UnsupportedGrantType,
    UnsupportedPopKey,
)
from coap_auth.keys import KeyRing, SigningKey, cose_key_set, jwks
from coap_auth.metrics import Metrics, measured_store
from coap_auth.secure.credentials import EdhocIdentity, PeerCredential, device_credential
from coap_auth.service.admin import Administration
from coap_auth.service.client_auth import Authenticator, Credentials
from coap_auth.service.rate_limit import RateLimiter
from coap_auth.service.revocation import RevocationList, TrlQuery
from coap_auth.service.rollover import KeyRollover
from coap_auth.store import (
    Audience,
    AuditReport,
    ChangeCounters,
    Client,
    IssuedAccess,
    MasterKey,
    RefreshFamily,
    Store,
    verify_log,
)
from coap_auth.store.revocation_audit import revocation_report
from coap_auth.tokens import (
    Claims,
    compress_cose_key,
    cose_key_from_public,
    decode_cose,
    encode_cwt,
    encode_jwt,
    encode_maced_cwt,
    public_key_from_cose,
    token_hash,
    verify_cwt,
    verify_jwt,
    verify_maced_cwt,
)
from coap_auth.tokens.cwt import decrypt_cwt, encode_encrypted_cwt
from coap_auth.wire import (
    MAX_TOKEN_LIFETIME,
    AceProfile,
    CnfMethod,
    ContentFormat,
    CoseAlg,
    CoseCurve,
    CoseKeyParam,
    CoseKty,
    CoseTag,
    GrantType,
    OscoreInput,
    TokenType,
)

log = logging.getLogger("coap_auth.service")

CTI_BYTES = 8
EDHOC_KEY_LABEL = b"edhoc static key P-256"
ECHO_KEY_LABEL = b"echo values HMAC-SHA-256"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
REFRESH_TOKEN_BYTES = 32
FAMILY_ID_BYTES = 16
# Replay-cache names of resource servers, apart from client ids.
RS_NAMESPACE = "rs:"
# RFC 9203 §3.2.1 OSCORE input material of a coap_oscore token: a random id (unique in
# practice: 64 bits), master secret and master salt; AEAD, HKDF and version at the RFC 8613
# defaults, no ID Context.
OSCORE_ID_BYTES = 8
OSCORE_MASTER_SECRET_BYTES = 16
OSCORE_SALT_BYTES = 8
# The ace_profile (38) value of each audience profile; none for bearer tokens.
ACE_PROFILES = {
    "coap_oscore": AceProfile.COAP_OSCORE,
    "edhoc_oscore": AceProfile.COAP_EDHOC_OSCORE,
}


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
    # Who the protected channel (EDHOC + OSCORE) authenticated; None on plain CoAP.
    peer: PeerCredential | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: bytes = field(repr=False)
    expires_in: int
    token_type: TokenType
    claims: Claims
    # Set when the granted scope is narrower than the one requested (RFC 6749 §5.1).
    narrowed_scope: str | None = None
    # {1: COSE_Key} or, for coap_oscore, {4: OSCORE input material}: it holds the master
    # secret, so it is never shown.
    cnf: Mapping[int, Any] | None = field(default=None, repr=False)
    refresh_token: bytes | None = field(default=None, repr=False)
    # The audience's ACE profile (None: bearer), and for edhoc_oscore the RS's key
    # {1: COSE_Key} when the audience registered one.
    profile: AceProfile | None = None
    rs_cnf: Mapping[int, Any] | None = None
    # For the access log and `tokens revoke --hash`: the token's RFC 9770 hash, and the
    # refresh family it belongs to (never the token itself).
    token_hash: bytes = b""
    family_id: bytes | None = None
    # What _mint made: "jwt", or "cwt" (signed, MACed or encrypted).
    token_format: str = "cwt"

    @property
    def hash_prefix(self) -> str:
        """The first 16 hex digits of the token hash: unique enough to name it in a log."""
        return self.token_hash.hex()[:16]


@dataclass(frozen=True, slots=True)
class TokenSubmission:
    """A /revoke or /introspect request: a token and the caller's credentials."""

    token: bytes = field(repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_assertion: bytes | None = field(default=None, repr=False)
    peer: PeerCredential | None = None


class AuthService:
    def __init__(
        self,
        store: Store,
        master_key: MasterKey,
        settings: Settings,
        clock: Clock,
        metrics: Metrics | None = None,
    ):
        # Its own registry unless given one; every store call timed into it.
        self.metrics = Metrics() if metrics is None else metrics
        store = measured_store(store, self.metrics, clock.now)
        self.store = store
        self.settings = settings
        self.clock = clock
        self._master_key = master_key
        self.keys = KeyRollover(store, settings, clock, self.metrics)
        self.revocations = RevocationList(store, settings.trl_max_n, settings.trl_max_diff_batch)
        self._auth = Authenticator(store, master_key, settings, clock)
        self._edhoc_identity: EdhocIdentity | None = None
        self.client_limits = RateLimiter(
            clock, settings.rate_limit_per_client, settings.rate_limit_window
        )
        # The operator's use cases (clients and audiences lifecycle), with the actor passed in.
        self.admin = Administration(store, self.keys, master_key, settings, clock)

    # -- keys ---------------------------------------------------------------------------------

    @property
    def key_ring(self) -> KeyRing:
        """The default family's ring."""
        return self.keys.ring()

    async def load_keys(self) -> KeyRing:
        """Read every key family, creating the first keys on an empty store."""
        await self.keys.load()
        return self.keys.ring()

    async def rotate_keys(
        self, family: str = "default", *, force: bool = False
    ) -> list[SigningKey]:
        """Rotate now: next becomes active, active retires, a new next key is published."""
        return await self.keys.rotate(family, force=force)

    async def revoke_key(self, kid: bytes) -> list[SigningKey]:
        return await self.keys.revoke(kid)

    async def advance_keys(self) -> list[SigningKey]:
        """Apply what the key schedule says is due now (rotations, removals)."""
        return await self.keys.advance()

    def key_set_document(self, content_format: int) -> bytes:
        """The published verification keys as /keys serves them: a JWKS for JSON (50), a
        COSE_KeySet (102) otherwise."""
        published = self.keys.published()
        return jwks(published) if content_format == ContentFormat.JSON else cose_key_set(published)

    def keys_max_age(self) -> int:
        """How long a copy of the key set may be cached: never past its next scheduled change."""
        return self.keys.keys_max_age()

    # -- the change feed ----------------------------------------------------------------------

    async def change_counters(self) -> ChangeCounters:
        """How often keys and revocations have changed, in this process or any other."""
        return await self.store.change_counters()

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        """Call `changed` whenever the store says something may have changed (runs until
        cancelled); `change_counters` then tells what."""
        await self.store.watch_changes(changed)

    async def verify_audit(self) -> AuditReport:
        """Walk the audit log's hash chain under the master key to the head it must end at,
        and check every client and audience row's MAC, and that every revocation the verified
        entries record still holds."""
        snapshot = await self.store.audit_snapshot()
        chain = verify_log(self._master_key.audit_mac, snapshot)
        # Only entries whose MACs verified are evidence; a broken chain is reported anyway.
        verified = snapshot.entries[: chain.entries]
        revocation = revocation_report(verified, snapshot.revocation, self.clock.now())
        return AuditReport(chain, await self.store.registry_report(), revocation)

    # -- the protected channel ----------------------------------------------------------------

    @property
    def edhoc_identity(self) -> EdhocIdentity:
        """The AS's own EDHOC credential: a P-256 key derived from the master key (so every
        data directory has one, every instance sharing the master key has the same one, and
        nothing new is stored), in a CCS whose sub is the issuer id."""
        if self._edhoc_identity is None:
            scalar = int.from_bytes(self._master_key.derive(EDHOC_KEY_LABEL), "big")
            private_key = ec.derive_private_key(scalar % (_P256_ORDER - 1) + 1, ec.SECP256R1())
            self._edhoc_identity = device_credential(self.settings.issuer, private_key)
        return self._edhoc_identity

    def echo_key(self) -> bytes:
        """The 32-byte key Echo values (RFC 9175 Appendix A) are MACed under: derived from the
        master key, so every instance sharing it accepts a value another issued, and nothing
        new is stored. Raises nothing."""
        return self._master_key.derive(ECHO_KEY_LABEL)

    async def peer_keys(self, peer_id: str) -> list[Any]:
        """The P-256 COSE_Keys registered under an id EDHOC names: the client's (unless
        disabled) and the audience's (its /introspect key). Whether the id may use a given
        endpoint is decided per request (authenticate_peer)."""
        keys: list[Any] = []
        client = await self.store.get_client(peer_id)
        if client is not None and not client.disabled and client.public_key is not None:
            keys.append(client.public_key)
        audience = await self.store.get_audience(peer_id)
        if audience is not None and audience.introspect_public_key is not None:
            keys.append(audience.introspect_public_key)
        usable = []
        for key in keys:
            try:
                public = public_key_from_cose(key)
            except UnsupportedPopKey:
                continue
            if isinstance(public, ec.EllipticCurvePublicKey):
                usable.append(public)
        return usable

    async def peer_registered(self, peer: PeerCredential) -> bool:
        """Whether the protected channel's peer is still a registered client (enabled) or
        audience under the key it authenticated with: what /revoke/trl checks on every
        request, as /token and /revoke do through authenticate()."""
        # A provisioned context (no EDHOC credential) stands for a client only.
        lookups: tuple[Any, ...] = (self._client_credentials,)
        if peer.credential is not None:
            lookups += (self._audience_credentials,)
        for lookup in lookups:
            try:
                await self._auth.authenticate_peer(lookup, peer, None, None, None)
            except InvalidClient:
                continue
            return True
        return False

    # -- /token -------------------------------------------------------------------------------

    async def issue_token(self, request: TokenRequest) -> IssuedToken:
        """The /token use case: a client_credentials grant or a refresh. The audience's
        profile decides the token: raises InvalidRequest for a JWT or a req_cnf with
        coap_oscore, a coap_oscore request not over OSCORE, or edhoc_oscore without a key to
        bind to; UnsupportedPopKey for a
        req_cnf that is not {1: COSE_Key} (P-256 for edhoc_oscore); InvalidClient,
        InvalidScope, InvalidGrant, UnsupportedGrantType as the request deserves."""
        if request.grant_type == GrantType.REFRESH_TOKEN:
            return await self.refresh(request)
        if request.grant_type != GrantType.CLIENT_CREDENTIALS:
            raise UnsupportedGrantType("grant type not supported")
        client = await self.authenticate(
            request.client_id, request.client_secret, request.client_assertion, request.peer
        )
        audience = await self._audience_for(client, request.audience)
        await self.keys.ensure_families([audience])
        scope, narrowed = self._grant_scope(client, request.scope)
        _check_secret_travels_protected(audience, request)
        cnf = _confirmation_key(client, audience, _pop_key(request.req_cnf))
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
        self.metrics.grant("client_credentials", issued.token_format)
        return replace(
            issued,
            narrowed_scope=scope if narrowed else None,
            refresh_token=refresh_token,
            family_id=family.family_id,
        )

    async def refresh(self, request: TokenRequest) -> IssuedToken:
        """RFC 9200 §5.8.1 / RFC 9700 §4.14: rotate a refresh token, catching reuse."""
        if request.refresh_token is None:
            raise InvalidRequest("refresh_token required")
        client = await self.authenticate(
            request.client_id, request.client_secret, request.client_assertion, request.peer
        )
        cnf = _pop_key(request.req_cnf)
        # mint() runs inside the store's transaction and cannot await: look audiences up first.
        audiences = {a.audience_id: a for a in await self.store.list_audiences()}
        await self.keys.ensure_families(list(audiences.values()))
        issued: list[IssuedToken] = []

        def mint(family: RefreshFamily) -> IssuedAccess:
            # RFC 9200 §5.8.1: a refresh may narrow the scope, never widen it or change
            # the audience or the key. Raising here rolls the refresh back.
            if request.audience is not None and request.audience != family.audience:
                raise InvalidGrant("refresh may not change the audience")
            audience = audiences.get(family.audience)
            if audience is None:
                raise InvalidGrant("audience no longer registered")
            _check_secret_travels_protected(audience, request)
            if audience.profile == "coap_oscore" and cnf is not None:
                raise InvalidRequest(_NO_REQ_CNF.format(audience.audience_id))
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
            # The family's key stays the token's (an edhoc_oscore family has one from its
            # grant); coap_oscore gets fresh material in _mint.
            family_cnf = _confirmation_key(client, audience, family.cnf)
            token = self._mint(family.client_id, audience, scope, family_cnf, request.token_format)
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
        self.metrics.refreshes.labels(outcome.status).inc()
        if outcome.status == "reused":
            self.metrics.reuse_detections.inc()
            self.metrics.family_kills.labels("reuse").inc()
            log.warning("refresh token reuse by %s: family killed", client.client_id)
            raise InvalidGrant("refresh token reused: its family is revoked")
        if outcome.status not in ("rotated", "grace"):
            raise InvalidGrant("refresh token invalid or expired")
        # The store may have rerun the transaction: the last token minted is the stored one.
        token = issued[-1]
        self.metrics.grant("refresh_token", token.token_format)
        family_id = outcome.family.family_id if outcome.family is not None else None
        return replace(token, refresh_token=successor, family_id=family_id)

    def _mint(
        self,
        client_id: str,
        audience: Audience,
        scope: str,
        cnf: Mapping[int, Any] | None,
        token_format: str | None,
    ) -> IssuedToken:
        """One access token for `audience`, by its profile: coap_oscore an encrypted CWT
        with fresh OSCORE input material (`cnf` must be None: see _confirmation_key), the
        others a signed or MACed token bound to `cnf` when given. Raises InvalidRequest for
        a JWT where only a CWT can be."""
        now = self.clock.now()
        # An audience registered before the cap may say more; verifiers refuse longer tokens.
        lifetime = min(audience.lifetime, MAX_TOKEN_LIFETIME)
        oscore = audience.profile == "coap_oscore"
        material = _oscore_material() if oscore else None
        key = self.keys.ring(audience.key_family).active
        jwt = (token_format or audience.token_format) == "jwt"
        # (A symmetric family MACs a CWT whatever format the audience names.)
        as_cwt = not jwt or isinstance(key.private_key, bytes)
        if cnf is not None and audience.profile == "edhoc_oscore" and as_cwt:
            # A CWT carries the client's point compressed (RFC 9053 §7.1.1), 33 bytes less,
            # so the token fits EAD_3 of EDHOC message_3 (draft-ietf-ace-edhoc-oscore-profile
            # -11 §4.1). A JWT keeps its full JWK (RFC 7518 has no compressed form). The
            # refresh family keeps the key uncompressed: a refresh's req_cnf is compared
            # with that.
            cnf = compress_cose_key(cnf)
        claims = Claims(
            iss=self.settings.issuer,
            sub=client_id,
            aud=audience.audience_id,
            exp=now + lifetime,
            iat=now,
            cti=secrets.token_bytes(CTI_BYTES),
            scope=scope,
            cnf_key=cnf,
            cnf_osc=material,
        )
        if material is not None:
            # RFC 9203 §3.2: the master secret is encrypted for the RS alone.
            if token_format == "jwt":
                raise InvalidRequest(
                    f"audience {audience.audience_id} takes encrypted CWTs (coap_oscore), not JWTs"
                )
            if key.alg != CoseAlg.AES_CCM_16_64_128 or not isinstance(key.private_key, bytes):
                raise RuntimeError(f"family {audience.key_family!r} has no AES key to encrypt with")
            access_token = encode_encrypted_cwt(claims, key.private_key, key.kid)
        elif isinstance(key.private_key, bytes):
            if token_format == "jwt":
                raise InvalidRequest("this audience takes only MACed CWTs")
            access_token = encode_maced_cwt(claims, key.private_key, key.kid)
        else:
            assert key.private_key is not None, "an active key has its private part"
            encode = encode_jwt if jwt else encode_cwt
            access_token = encode(claims, key.private_key, key.alg, key.kid)
        if material is not None:
            confirmation: dict[int, Any] | None = {CnfMethod.OSC: dict(material)}
        else:
            confirmation = {CnfMethod.COSE_KEY: dict(cnf)} if cnf is not None else None
        rs_key = audience.introspect_public_key
        return IssuedToken(
            access_token=access_token,
            token_format="cwt" if as_cwt or material is not None else "jwt",
            token_hash=token_hash(access_token),
            expires_in=lifetime,
            token_type=TokenType.POP if confirmation is not None else TokenType.BEARER,
            claims=claims,
            cnf=confirmation,
            profile=ACE_PROFILES.get(audience.profile),
            # draft-ietf-ace-edhoc-oscore-profile-11 §3.3: AUTH_CRED_RS for the client.
            rs_cnf=(
                {CnfMethod.COSE_KEY: dict(rs_key)}
                if audience.profile == "edhoc_oscore" and rs_key is not None
                else None
            ),
        )

    async def authenticate(
        self,
        client_id: str | None,
        secret: str | None,
        assertion: bytes | None,
        peer: PeerCredential | None = None,
    ) -> Client:
        """A device, by the protected channel's peer, or by signed assertion or shared secret
        (docs/protocol.md), within its rate limit (counted only once authenticated, so nobody can
        use up another's)."""
        if peer is not None:
            client = await self._auth.authenticate_peer(
                self._client_credentials, peer, client_id, secret, assertion
            )
        else:
            client = await self._auth.authenticate(
                self._client_credentials, client_id, secret, assertion
            )
        self.client_limits.hit(client.client_id, "client")
        return client

    def secret_digest(self, secret: str) -> bytes:
        return self._auth.secret_digest(secret)

    # -- /revoke ------------------------------------------------------------------------------

    async def revoke(self, request: TokenSubmission) -> None:
        """RFC 7009 semantics: a client revokes its own access token (by hash) or refresh
        token (its family dies). An unknown or foreign token changes nothing and the answer
        is the same, so it says nothing about the token."""
        client = await self.authenticate(
            request.client_id, request.client_secret, request.client_assertion, request.peer
        )
        now = self.clock.now()
        actor = f"client {client.client_id}"
        if await self.store.revoke_access(token_hash(request.token), client.client_id, now, actor):
            log.info("access token revoked by %s", client.client_id)
            return
        digest = self._master_key.digest(request.token)
        if await self.store.kill_family_of(digest, client.client_id, "revoked by client", now):
            self.metrics.family_kills.labels("client_revoke").inc()
            log.info("refresh family revoked by %s", client.client_id)

    async def revoke_token_hash(self, hash_value: bytes) -> bool:
        """An operator revokes any live access token by its hash."""
        return await self.store.revoke_access(hash_value, None, self.clock.now(), "operator")

    async def trl(self, query: TrlQuery, requester: str | None) -> dict[int, Any]:
        return await self.revocations.answer(query, requester)

    @property
    def trl_max_n(self) -> int:
        """MAX_N (RFC 9770 §6.2): the most diff entries one answer may hold."""
        return self.revocations.max_n

    async def trl_changes_since(self, trl_seq: int | None) -> tuple[frozenset[str] | None, int]:
        """Whose part of the list changed after update `trl_seq` (None: everyone's), and the
        list's newest update."""
        return await self.revocations.changes_since(trl_seq)

    async def trl_size(self) -> int:
        """How many token hashes the whole list holds now (one read of it)."""
        hashes, _, _ = await self.store.trl(None)
        return len(hashes)

    async def plan_trl_sweep(self) -> None:
        """Learn when the next listed token expires (after any change of the list)."""
        await self.revocations.plan_sweep()

    async def sweep_trl(self) -> int:
        """RFC 9770 §5.1: delist the hashes of tokens expired by now; returns how many."""
        return await self.revocations.sweep_due(self.clock.now())

    # -- /introspect --------------------------------------------------------------------------

    async def introspect(self, request: TokenSubmission) -> Claims | None:
        """RFC 9200 §5.9 for a registered resource server: the claims of a token that is
        active for it, or None (answered {active: false}) for anything else."""
        if request.peer is not None and request.peer.credential is None:
            # A provisioned context (clients oscore) stands for a client, never an audience.
            raise InvalidClient("client authentication failed")
        if request.peer is not None:
            audience = await self._auth.authenticate_peer(
                self._audience_credentials,
                request.peer,
                request.client_id,
                request.client_secret,
                request.client_assertion,
                replay_namespace=RS_NAMESPACE,
            )
        else:
            audience = await self._auth.authenticate(
                self._audience_credentials,
                request.client_id,
                request.client_secret,
                request.client_assertion,
                replay_namespace=RS_NAMESPACE,
            )
        # Only a token of this audience's own key family can be for it: a resource server that
        # holds an HMAC family's key cannot mint tokens another audience would accept.
        claims = self._verified_claims(request.token, audience.key_family)
        if claims is None:
            return None
        try:
            claims.validate(
                now=self.clock.now(), issuer=self.settings.issuer, audience=audience.audience_id
            )
        except TokenError:
            return None
        # And only a token we issued and have not revoked (our record of it, by hash).
        if await self.store.token_status(token_hash(request.token)) != "live":
            return None
        return claims

    def _verified_claims(self, token: bytes, family: str) -> Claims | None:
        """Claims of a token signed, MACed or (coap_oscore) encrypted by a published key of
        `family`, else None."""
        try:
            if token[:1] == b"e":  # a JWS compact serialisation starts with base64url "ey"
                return verify_jwt(token, self.keys.lookup_in(family))
            message = decode_cose(token)
            if message.tag == CoseTag.ENCRYPT0:
                return decrypt_cwt(
                    token,
                    lambda kid: self.keys.secret_key(kid, family, CoseAlg.AES_CCM_16_64_128),
                )
            if message.tag == CoseTag.MAC0:
                kid = message.kid
                key = self.keys.mac_key(kid, family) if isinstance(kid, bytes) else None
                return None if key is None else verify_maced_cwt(token, key)
            return verify_cwt(token, self.keys.lookup_in(family))
        except TokenError:
            return None

    async def _client_credentials(self, client_id: str) -> Credentials[Client] | None:
        client = await self.store.get_client(client_id)
        if client is None:
            return None
        return Credentials(
            client,
            client.client_id,
            client.secret_digest,
            client.public_key,
            client.disabled,
            # A rotated secret's predecessor, until its overlap ends (clients rotate-secret).
            client.previous_secret_digest
            if client.previous_secret_valid(self.clock.now())
            else None,
        )

    async def _audience_credentials(self, audience_id: str) -> Credentials[Audience] | None:
        audience = await self.store.get_audience(audience_id)
        if audience is None or (
            audience.introspect_secret_digest is None and audience.introspect_public_key is None
        ):
            return None
        return Credentials(
            audience,
            audience.audience_id,
            audience.introspect_secret_digest,
            audience.introspect_public_key,
        )

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


_NO_REQ_CNF = "audience {} takes no req_cnf: the AS provides the OSCORE input material"
_NEEDS_KEY = (
    "audience {} needs a proof-of-possession key: send req_cnf or register the client's public key"
)


def _check_secret_travels_protected(audience: Audience, request: TokenRequest) -> None:
    """A coap_oscore answer carries the OSCORE master secret (RFC 9203 §3.2): it is issued
    only over the protected channel, also when `require_oscore` is off (a lab), or anyone on
    the path could set the token's context up. Raises InvalidRequest."""
    if audience.profile == "coap_oscore" and request.peer is None:
        raise InvalidRequest(
            f"audience {audience.audience_id} (coap_oscore): its tokens come with a master"
            " secret, issued only over OSCORE"
        )


def _confirmation_key(
    client: Client, audience: Audience, requested: Mapping[int, Any] | None
) -> Mapping[int, Any] | None:
    """The key a token for `audience` is bound to, by its profile: bearer, the requested one
    if any; coap_oscore, none (the token carries OSCORE input material instead; a request
    with req_cnf raises InvalidRequest); edhoc_oscore, the requested one or else the
    client's registered public key, a P-256 key either way (EDHOC cipher suite 2: raises
    UnsupportedPopKey), and InvalidRequest when there is neither."""
    if audience.profile == "coap_oscore":
        if requested is not None:
            raise InvalidRequest(_NO_REQ_CNF.format(audience.audience_id))
        return None
    if audience.profile != "edhoc_oscore":
        return requested
    key = requested
    if key is None and client.public_key is not None:
        key = _pop_key({CnfMethod.COSE_KEY: client.public_key})
    if key is None:
        raise InvalidRequest(_NEEDS_KEY.format(audience.audience_id))
    if key.get(CoseKeyParam.KTY) != CoseKty.EC2 or key.get(CoseKeyParam.CRV) != CoseCurve.P256:
        raise UnsupportedPopKey(f"audience {audience.audience_id} needs a P-256 key (EDHOC)")
    return key


def _oscore_material() -> dict[int, bytes]:
    """Fresh OSCORE input material for one token (RFC 9203 §3.2.1: id, ms, salt)."""
    return {
        OscoreInput.ID: secrets.token_bytes(OSCORE_ID_BYTES),
        OscoreInput.MS: secrets.token_bytes(OSCORE_MASTER_SECRET_BYTES),
        OscoreInput.SALT: secrets.token_bytes(OSCORE_SALT_BYTES),
    }


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
    claims = issued.claims
    return IssuedAccess(issued.token_hash, claims.sub, claims.exp, claims.aud)
