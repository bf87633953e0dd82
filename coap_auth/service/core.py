"""The use cases of the authorization server: issue, refresh, revoke, introspect, rotate.

Async and transport-free: the CoAP layer parses requests into these dataclasses and renders
what comes back. The clock is injected; nothing here sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.clock import Clock
from coap_auth.config import Settings
from coap_auth.errors import (
    InvalidClient,
    TokenError,
    UnsupportedPopKey,
)
from coap_auth.keys import DEFAULT_FAMILY, KeyRing, SigningKey, cose_key_set, jwks
from coap_auth.metrics import KillCause, Metrics, measured_store
from coap_auth.secure.credentials import EdhocIdentity, PeerCredential, device_credential
from coap_auth.service.admin import Administration
from coap_auth.service.client_auth import (
    Authenticator,
    Credentials,
    Lookup,
    audience_credentials,
    client_credentials,
)
from coap_auth.service.grants import Grants
from coap_auth.service.introspection import verified_claims
from coap_auth.service.minting import IssuedToken, TokenMinter, TokenRequest
from coap_auth.service.rate_limit import RateLimiter
from coap_auth.service.registry_cache import RegistryCache
from coap_auth.service.revocation import RevocationList, TrlQuery
from coap_auth.service.rollover import KeyRollover
from coap_auth.store import (
    Audience,
    AuditReport,
    ChangeCounters,
    Client,
    MasterKey,
    Store,
    verify_log,
)
from coap_auth.store.records import TokenStatus
from coap_auth.store.revocation_audit import revocation_report
from coap_auth.tokens import (
    Claims,
    public_key_from_cose,
    token_hash,
)
from coap_auth.wire import (
    ContentFormat,
)

log = logging.getLogger("coap_auth.service")

EDHOC_KEY_LABEL = b"edhoc static key P-256"
ECHO_KEY_LABEL = b"echo values HMAC-SHA-256"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Replay-cache names of resource servers, apart from client ids.
RS_NAMESPACE = "rs:"


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
        self._settings = settings
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
        # The /token path reads clients and audiences from memory (coap_auth.service.grants).
        self.registry = RegistryCache(store)
        self.minter = TokenMinter(self.keys, settings, clock)
        self.grants = Grants(
            store,
            self.registry,
            self.minter,
            self.keys,
            self._authenticate_for_grant,
            master_key,
            settings,
            clock,
            self.metrics,
        )

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """New settings for the use cases that read them per request (tests change them)."""
        self._settings = settings
        self.grants.settings = settings
        self.minter.settings = settings

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
        self, family: str = DEFAULT_FAMILY, *, actor: str, force: bool = False
    ) -> list[SigningKey]:
        """Rotate now: next becomes active, active retires, a new next key is published; the
        audit log names `actor`."""
        return await self.keys.rotate(family, force=force, actor=actor)

    async def revoke_key(self, kid: bytes, *, actor: str) -> list[SigningKey]:
        return await self.keys.revoke(kid, actor=actor)

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
        """How often keys and revocations have changed, in this process or any other; the
        registry cache reloads when the registry moved."""
        counters = await self.store.change_counters()
        self.registry.changed(counters.registry)
        return counters

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
        """The /token use case (coap_auth.service.grants)."""
        return await self.grants.issue(request)

    async def refresh(self, request: TokenRequest) -> IssuedToken:
        return await self.grants.refresh(request)

    async def authenticate(
        self,
        client_id: str | None,
        secret: str | None,
        assertion: bytes | None,
        peer: PeerCredential | None = None,
        *,
        lookup: Lookup[Client] | None = None,
    ) -> Client:
        """A device, by the protected channel's peer, or by signed assertion or shared secret
        (docs/protocol.md), within its rate limit (counted only once authenticated, so nobody can
        use up another's); the client as stored now, unless `lookup` says otherwise."""
        lookup = lookup or self._client_credentials
        if peer is not None:
            client = await self._auth.authenticate_peer(lookup, peer, client_id, secret, assertion)
        else:
            client = await self._auth.authenticate(lookup, client_id, secret, assertion)
        self.client_limits.hit(client.client_id, "client")
        return client

    async def _authenticate_for_grant(
        self,
        client_id: str | None,
        secret: str | None,
        assertion: bytes | None,
        peer: PeerCredential | None,
    ) -> Client:
        """`authenticate` on the registry cache (the /token path: its store write checks the
        rows it rests on are unchanged)."""
        seen: dict[str, Client | None] = {}

        async def cached(caller_id: str) -> Credentials[Client] | None:
            seen[caller_id] = client = await self.registry.client(caller_id)
            return client_credentials(client, self.clock.now())

        try:
            return await self.authenticate(client_id, secret, assertion, peer, lookup=cached)
        except InvalidClient:
            # The cache may be behind the store (a client added, re-keyed or enabled since it
            # loaded). Only if the store holds another row than the cache for an id looked up,
            # and the registry has moved since the load, is the caller authenticated again, on
            # the reloaded cache: a failure costs one read per id (an unknown id what a known
            # one with a bad secret or signature does), and a row changed outside coap-auth
            # (an older sealed copy put back) is never taken up.
            for caller_id, client in list(seen.items()):
                stored = await self.store.get_client(caller_id)
                if _version(stored) != _version(client) and await self.registry.reload_if_moved():
                    return await self.authenticate(
                        client_id, secret, assertion, peer, lookup=cached
                    )
            raise

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
            self.metrics.family_kills.labels(KillCause.CLIENT_REVOKE).inc()
            log.info("refresh family revoked by %s", client.client_id)

    async def revoke_token_hash(self, hash_value: bytes, *, actor: str) -> bool:
        """`actor` revokes any live access token by its hash."""
        return await self.store.revoke_access(hash_value, None, self.clock.now(), actor)

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
        claims = verified_claims(request.token, audience.key_family, self.keys)
        if claims is None:
            return None
        try:
            claims.validate(
                now=self.clock.now(), issuer=self.settings.issuer, audience=audience.audience_id
            )
        except TokenError:
            return None
        # And only a token we issued and have not revoked (our record of it, by hash).
        if await self.store.token_status(token_hash(request.token)) is not TokenStatus.LIVE:
            return None
        return claims

    async def _client_credentials(self, client_id: str) -> Credentials[Client] | None:
        return client_credentials(await self.store.get_client(client_id), self.clock.now())

    async def _audience_credentials(self, audience_id: str) -> Credentials[Audience] | None:
        return audience_credentials(await self.store.get_audience(audience_id))


def _version(client: Client | None) -> bytes | None:
    return None if client is None else client.version
